"""Routing drift between two models on the same tokens: which experts each picks, how it mixes them, what it outputs.

Two ways to run, the same figures: ``compare_two_pass`` runs model A over the corpus into a compact on-disk record
(``compare_record``), lets A go, then streams model B over the recorded batches and compares as it goes, so only
one model is ever in memory and memory stays flat with the corpus; ``compare_together`` runs both on each batch in
turn when both fit. Both paths round A's record the same way (ids int16, weights and routing probabilities float16)
and B's side identically before comparing, so the two modes agree exactly and a model compared with itself gives
agreement 1, JS 0 and TV 0 exactly. Sums stay on the device; the host reads them once at the end.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

import torch

from moe_inspect.analysis import distributed
from moe_inspect.analysis.compare_batch import Comparer, Recorder, decode, run_a, run_b
from moe_inspect.analysis.compare_checks import check_decoder_only
from moe_inspect.analysis.compare_checks import check_same_moe as check_same_moe
from moe_inspect.analysis.compare_checks import check_same_tokenizer as check_same_tokenizer
from moe_inspect.analysis.compare_checks import precheck_same_moe as precheck_same_moe
from moe_inspect.analysis.compare_record import BatchRecord, RecordStore, bytes_per_token, host_list
from moe_inspect.analysis.compare_reduce import reduce_comparer
from moe_inspect.analysis.compare_report import KL_SUPPORT as KL_SUPPORT
from moe_inspect.analysis.compare_report import CompareReport as CompareReport
from moe_inspect.analysis.compare_report import build_report
from moe_inspect.analysis.outputs import OutputHead
from moe_inspect.analysis.run_info import environment, model_identity
from moe_inspect.errors import UserError
from moe_inspect.io.corpus import Batch
from moe_inspect.model.capture import capture
from moe_inspect.model.loading import LoadedModel
from moe_inspect.model.routers import RouterSpec


class Interrupted(UserError):
    """Ctrl-C: nothing was written; the message says how far the run got."""

    exit_code = 130


class PerTokenSink(Protocol):
    def write(self, batch: Batch, routers: list[RouterSpec], a: list[torch.Tensor], b: list[torch.Tensor]) -> None: ...


# ------------------------------------------------------------------------------------------------------------
# the two modes
# ------------------------------------------------------------------------------------------------------------

Progress = Callable[[str, int], None]  # (phase "a" | "b" | "both", tokens in the batch just done)


def describe_model(loaded: LoadedModel) -> dict[str, Any]:
    return {**model_identity(loaded), "routers": [spec.describe() for spec in loaded.routers]}


def _free() -> None:
    """Return a dropped model's memory now, before the next one loads."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _with_per_token(comparer: Comparer, per_token: PerTokenSink | None, record: BatchRecord) -> None:
    if per_token is None:
        return
    batch = Batch(record.input_ids.long(), record.attention_mask.long(), int(record.attention_mask.sum()), 0)
    b = host_list([comparer.b_experts[spec.index] for spec in comparer.routers])  # one copy per batch
    per_token.write(batch, comparer.routers, [t.long() for t in record.experts], b)


def compare_two_pass(
    load_a: Callable[[], LoadedModel],
    load_b: Callable[[], LoadedModel],
    batches: Iterable[Batch],
    *,
    scratch: str | Path | None = None,
    progress: Progress | None = None,
    per_token: PerTokenSink | None = None,
    run_info: dict[str, Any] | None = None,
    on_record: Callable[[int, int], None] | None = None,
) -> CompareReport:
    """A over the corpus into an on-disk record, A let go, then B streamed against the record.

    ``load_a``/``load_b`` are called one after the other, so the caller need not hold either model. Ctrl-C in
    either pass raises ``Interrupted`` saying how far it got; the scratch record is removed in every case.
    ``on_record(bytes, tokens)`` is told the record's size once A's pass is done.
    """
    started = time.perf_counter()
    with RecordStore(scratch) as store:
        loaded: LoadedModel | None = load_a()
        assert loaded is not None
        check_decoder_only(loaded.routers, "compare")
        # Shapes only: a RouterSpec holds its module, which would keep model A's router weights alive.
        routers_a = [replace(spec, module=None, selection_module=None) for spec in loaded.routers]
        describe_a = describe_model(loaded)
        tokens = 0
        try:
            head = OutputHead(loaded.model)
            recorder = Recorder(loaded.routers)
            with torch.inference_mode(), capture(loaded.routers, sink=recorder, keep=False):
                for batch in distributed.shard(batches):  # under torchrun: this rank's share
                    store.append(run_a(loaded, head, recorder, batch).to_host())
                    tokens += batch.tokens
                    if progress is not None:
                        progress("a", batch.tokens)
        except KeyboardInterrupt:
            raise Interrupted(
                f"Interrupted during model A's pass after {store.batches} batches ({tokens:,} tokens); "
                "nothing was written."
            ) from None
        finally:
            head = recorder = loaded = None  # type: ignore[assignment]
            _free()
        if on_record is not None:
            on_record(store.bytes, tokens)
        loaded_b = load_b()
        check_same_moe(routers_a, loaded_b.routers)
        head = OutputHead(loaded_b.model)
        comparer = Comparer(loaded_b.routers, keep_b=per_token is not None)
        done = done_tokens = 0
        try:
            with torch.inference_mode(), capture(loaded_b.routers, sink=comparer, keep=False):
                for record in store:
                    run_b(loaded_b, head, comparer, record)
                    _with_per_token(comparer, per_token, record)
                    done += 1
                    done_tokens += comparer.tokens
                    if progress is not None:
                        progress("b", comparer.tokens)
        except KeyboardInterrupt:
            raise Interrupted(
                f"Interrupted during model B's pass after {done} of {store.batches} batches "
                f"({done_tokens:,} of {tokens:,} tokens); nothing was written."
            ) from None
        batches_done, record_bytes = reduce_comparer(comparer, store.batches, store.bytes)
        run = {
            "model_a": describe_a,
            "model_b": describe_model(loaded_b),
            "batches": batches_done,
            "elapsed_s": round(time.perf_counter() - started, 3),
            "record_bytes_per_token_formula": bytes_per_token(routers_a),
            **environment(),
            **(run_info or {}),
        }
        return build_report(comparer, "two-pass", record_bytes, run)


def compare_together(
    loaded_a: LoadedModel,
    loaded_b: LoadedModel,
    batches: Iterable[Batch],
    *,
    progress: Progress | None = None,
    per_token: PerTokenSink | None = None,
    run_info: dict[str, Any] | None = None,
) -> CompareReport:
    """Both models in memory: each batch through A, then B, compared at once (same figures as two-pass)."""
    check_decoder_only(loaded_a.routers, "compare")
    check_same_moe(loaded_a.routers, loaded_b.routers)
    started = time.perf_counter()
    head_a, head_b = OutputHead(loaded_a.model), OutputHead(loaded_b.model)
    recorder = Recorder(loaded_a.routers)
    comparer = Comparer(loaded_b.routers, keep_b=per_token is not None)
    batches_done = tokens = 0
    try:
        with torch.inference_mode():
            # Captures are per batch and per model, so a model compared with itself is never hooked twice at once.
            for batch in distributed.shard(batches):  # under torchrun: this rank's share
                with capture(loaded_a.routers, sink=recorder, keep=False):
                    record = run_a(loaded_a, head_a, recorder, batch)
                with capture(loaded_b.routers, sink=comparer, keep=False):
                    comparer.begin(record, loaded_b.input_device)
                    decoded = decode(loaded_b, head_b, batch.input_ids, batch.attention_mask)
                    comparer.compare_outputs(head_b, decoded)
                if per_token is not None:
                    _with_per_token(comparer, per_token, record.to_host())
                batches_done += 1
                tokens += batch.tokens
                if progress is not None:
                    progress("both", batch.tokens)
    except KeyboardInterrupt:
        raise Interrupted(
            f"Interrupted after {batches_done} batches ({tokens:,} tokens); nothing was written."
        ) from None
    (batches_done,) = reduce_comparer(comparer, batches_done)
    run = {
        "model_a": describe_model(loaded_a),
        "model_b": describe_model(loaded_b),
        "batches": batches_done,
        "elapsed_s": round(time.perf_counter() - started, 3),
        **environment(),
        **(run_info or {}),
    }
    return build_report(comparer, "together", None, run)
