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
import platform
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd
import torch

from moe_inspect import metrics, schemas
from moe_inspect.analysis import distributed
from moe_inspect.analysis.compare_record import (
    OUTPUT_TOP,
    PROB_DTYPE,
    WEIGHT_DTYPE,
    BatchRecord,
    RecordStore,
    bytes_per_token,
    expert_dtype,
    host_list,
)
from moe_inspect.analysis.compare_reduce import reduce_comparer
from moe_inspect.analysis.outputs import DecoderPass, OutputHead, logprobs_at, topk_logprobs
from moe_inspect.capture import RouterOutput, capture
from moe_inspect.corpus import Batch
from moe_inspect.errors import UserError
from moe_inspect.export import replace_folder, write_csv, write_json
from moe_inspect.loading import LoadedModel
from moe_inspect.routers import RouterSpec

#: KL's support, said wherever the figure is shown.
KL_SUPPORT = f"model A's top-{OUTPUT_TOP} tokens plus one bucket for the rest of the vocabulary"

# Per-router sums, in this order, in one float64 device vector.
_SUMS = (
    "first",
    "overlap",
    "jaccard",
    "exact",
    "weight_overlap",
    "js",
    "margin_changed",
    "changed",
    "margin_kept",
)


class Interrupted(UserError):
    """Ctrl-C: nothing was written; the message says how far the run got."""

    exit_code = 130


class PerTokenSink(Protocol):
    def write(self, batch: Batch, routers: list[RouterSpec], a: list[torch.Tensor], b: list[torch.Tensor]) -> None: ...


# ------------------------------------------------------------------------------------------------------------
# checks
# ------------------------------------------------------------------------------------------------------------


def check_same_tokenizer(tokenizer_a: Any, tokenizer_b: Any) -> None:
    """Both models must read the same token ids: their vocabularies must be identical."""
    if tokenizer_a.get_vocab() != tokenizer_b.get_vocab():
        raise UserError(
            f"The two models use different tokenizers ({len(tokenizer_a.get_vocab()):,} vs "
            f"{len(tokenizer_b.get_vocab()):,} tokens, or different ids), so they cannot read the same tokens."
        )


def check_same_moe(routers_a: list[RouterSpec], routers_b: list[RouterSpec]) -> None:
    """Same MoE layers in the same order, each with the same E, k and distribution width."""
    if len(routers_a) != len(routers_b):
        raise UserError(
            f"Model A has {len(routers_a)} MoE routers and model B has {len(routers_b)}, so their layers cannot be "
            "compared."
        )
    for a, b in zip(routers_a, routers_b, strict=True):
        if (a.layer, a.kind, a.num_experts, a.top_k, a.num_columns) != (
            b.layer,
            b.kind,
            b.num_experts,
            b.top_k,
            b.num_columns,
        ):
            raise UserError(
                f"MoE layer {a.layer} differs: model A has {a.num_experts} experts, top-{a.top_k} there and model B "
                f"(layer {b.layer}) has {b.num_experts} experts, top-{b.top_k}."
            )


def precheck_same_moe(
    model_a: str, model_b: str, revision_a: str | None, revision_b: str | None, trust_remote_code: bool
) -> None:
    """From the two configs alone (meta device, no weights): refuse different MoE shapes before A's pass.

    Best effort: a config this cannot describe is left to ``check_same_moe`` once model B is loaded.
    """
    if (model_a, revision_a) == (model_b, revision_b):
        return
    from moe_inspect.info import describe
    from moe_inspect.source import load_config

    shapes = []
    for model, revision in ((model_a, revision_a), (model_b, revision_b)):
        try:
            info = describe(load_config(model, revision, trust_remote_code), trust_remote_code=trust_remote_code)
        except Exception:  # the loaded models are checked later anyway
            return
        shapes.append([(r.layer, r.kind, r.experts, r.top_k) for r in info.routers])
    if len(shapes[0]) != len(shapes[1]):
        raise UserError(
            f"Model A has {len(shapes[0])} MoE routers and model B has {len(shapes[1])}, so their layers cannot be "
            "compared."
        )
    for a, b in zip(*shapes, strict=True):
        if a != b:
            raise UserError(
                f"MoE layer {a[0]} differs: model A has {a[2]} experts, top-{a[3]} there and model B "
                f"(layer {b[0]}) has {b[2]} experts, top-{b[3]}."
            )


# ------------------------------------------------------------------------------------------------------------
# one model's pass over one batch
# ------------------------------------------------------------------------------------------------------------


def _positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).clamp_min(0)


def _decode(loaded: LoadedModel, head: OutputHead, input_ids: torch.Tensor, mask: torch.Tensor) -> DecoderPass:
    device = loaded.input_device
    return head.decode(
        input_ids.to(device, non_blocking=True).long(),
        mask.to(device, non_blocking=True).long(),
        _positions(mask.long()).to(device, non_blocking=True),
    )


def _real_rows(mask: torch.Tensor) -> torch.Tensor:
    """Flat indices of real tokens, computed on the host from the CPU mask (index_select then needs no sync)."""
    return mask.reshape(-1).nonzero().squeeze(-1)


class _Recorder:
    """Capture sink for model A: the record's per-router fields of the real rows, left on the device."""

    def __init__(self, routers: list[RouterSpec]) -> None:
        self.routers = routers
        self.rows: dict[torch.device, torch.Tensor] = {}
        self.rows_cpu: torch.Tensor | None = None
        self.fields: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def begin(self, mask: torch.Tensor) -> None:
        self.rows_cpu = _real_rows(mask)
        self.rows = {}
        self.fields = {}

    def _rows_on(self, device: torch.device) -> torch.Tensor:
        if device not in self.rows:
            assert self.rows_cpu is not None
            self.rows[device] = self.rows_cpu.to(device, non_blocking=True)
        return self.rows[device]

    def __call__(self, spec: RouterSpec, out: RouterOutput) -> None:
        rows = self._rows_on(out.experts.device)
        self.fields[spec.index] = (
            out.experts.index_select(0, rows).to(expert_dtype(spec)),
            out.weights.index_select(0, rows).to(WEIGHT_DTYPE),
            out.probabilities(spec).index_select(0, rows).to(PROB_DTYPE),
        )

    def record(self, batch: Batch, logp: torch.Tensor, ids: torch.Tensor, rest: torch.Tensor) -> BatchRecord:
        missing = [spec.path for spec in self.routers if spec.index not in self.fields]
        if missing:
            raise RuntimeError(f"routers did not fire: {', '.join(missing)}")
        fields = [self.fields[spec.index] for spec in self.routers]
        return BatchRecord(
            input_ids=batch.input_ids.to(torch.int32),
            attention_mask=batch.attention_mask.to(torch.int8),
            experts=[f[0] for f in fields],
            weights=[f[1] for f in fields],
            probs=[f[2] for f in fields],
            out_logp=logp.float(),
            out_ids=ids.to(torch.int32),
            out_rest=rest.float(),
        )


def _run_a(loaded: LoadedModel, head: OutputHead, recorder: _Recorder, batch: Batch) -> BatchRecord:
    recorder.begin(batch.attention_mask)
    decoded = _decode(loaded, head, batch.input_ids, batch.attention_mask)
    logp, ids, rest, _ = topk_logprobs(head, decoded, OUTPUT_TOP)
    return recorder.record(batch, logp, ids, rest)


# ------------------------------------------------------------------------------------------------------------
# comparing model B against the record, on the device
# ------------------------------------------------------------------------------------------------------------


@dataclass
class _RouterSums:
    sums: torch.Tensor  # float64 [len(_SUMS)]
    count_a: torch.Tensor  # int64 [C]
    count_b: torch.Tensor  # int64 [C]
    tokens: int = 0


class _Comparer:
    """Capture sink for model B: compares each router's output with A's record of the same batch."""

    def __init__(self, routers: list[RouterSpec], keep_b: bool = False) -> None:
        self.routers = routers
        self.keep_b = keep_b
        self.state: dict[int, _RouterSums] = {}
        self.record: BatchRecord | None = None
        self.rows_cpu: torch.Tensor | None = None
        self.rows: dict[torch.device, torch.Tensor] = {}
        self.tokens = 0
        self.b_experts: dict[int, torch.Tensor] = {}
        self.out_sums: torch.Tensor | None = None  # float64 [top-1 agreements, KL sum]
        self.positions = 0

    def begin(self, record: BatchRecord, device: torch.device) -> None:
        self.record = record.to(device)
        self.rows_cpu = _real_rows(record.attention_mask)
        self.rows = {}
        self.tokens = int(self.rows_cpu.numel())
        self.b_experts = {}

    def _rows_on(self, device: torch.device) -> torch.Tensor:
        if device not in self.rows:
            assert self.rows_cpu is not None
            self.rows[device] = self.rows_cpu.to(device, non_blocking=True)
        return self.rows[device]

    def __call__(self, spec: RouterSpec, out: RouterOutput) -> None:
        assert self.record is not None, "begin() must be called before the forward"
        device = out.experts.device
        rows = self._rows_on(device)
        i = spec.index
        exp_a = self.record.experts[i].to(device).long()
        w_a = self.record.weights[i].to(device)
        p_a = self.record.probs[i].to(device)
        # B goes through the same rounding as A's record, so identical routing compares as identical.
        exp_b = out.experts.index_select(0, rows).to(expert_dtype(spec)).long()
        w_b = out.weights.index_select(0, rows).to(WEIGHT_DTYPE)
        p_b = out.probabilities(spec).index_select(0, rows).to(PROB_DTYPE)
        state = self.state.get(i)
        if state is None:
            c = spec.num_columns
            state = self.state[i] = _RouterSums(
                torch.zeros(len(_SUMS), dtype=torch.float64, device=device),
                torch.zeros(c, dtype=torch.int64, device=device),
                torch.zeros(c, dtype=torch.int64, device=device),
            )
        k = exp_a.shape[1]
        inter = metrics.set_intersection(exp_a, exp_b).double()
        exact = (inter == k).double()
        margin = metrics.kth_margin(p_a, spec.top_k).double()
        per_token = torch.stack(
            [
                (exp_a[:, 0] == exp_b[:, 0]).double(),
                inter / k,
                inter / (2 * k - inter),
                exact,
                metrics.weight_overlap(exp_a, w_a, exp_b, w_b).double(),
                metrics.js_divergence(p_a, p_b).double(),
                margin * (1 - exact),
                1 - exact,
                margin * exact,
            ]
        )
        state.sums += per_token.sum(-1)
        state.count_a += metrics.expert_counts(exp_a, spec.num_columns)
        state.count_b += metrics.expert_counts(exp_b, spec.num_columns)
        state.tokens += self.tokens
        if self.keep_b:
            self.b_experts[i] = exp_b

    def compare_outputs(self, head: OutputHead, decoded: DecoderPass) -> None:
        assert self.record is not None
        logp_b, rest_b, top_b = logprobs_at(head, decoded, self.record.out_ids.long())
        device = logp_b.device
        logp_a = self.record.out_logp.to(device)
        # A's most likely token is B's most likely too (ties count: bf16 logits tie often).
        agree = (logp_b[:, 0] >= top_b).double().sum()
        kl = metrics.topk_kl(logp_a, self.record.out_rest.to(device), logp_b, rest_b).sum()
        sums = torch.stack([agree, kl])
        self.out_sums = sums if self.out_sums is None else self.out_sums + sums.to(self.out_sums.device)
        self.positions += int(self.record.out_ids.shape[0])


def _run_b(loaded: LoadedModel, head: OutputHead, comparer: _Comparer, record: BatchRecord) -> None:
    comparer.begin(record, loaded.input_device)
    decoded = _decode(loaded, head, record.input_ids, record.attention_mask)
    comparer.compare_outputs(head, decoded)


# ------------------------------------------------------------------------------------------------------------
# the report
# ------------------------------------------------------------------------------------------------------------


@dataclass
class CompareReport:
    """``layers``, ``experts`` and ``summary`` (schemas ``COMPARE_*``), plus what was run (``run``, run.json)."""

    layers: pd.DataFrame
    experts: pd.DataFrame
    summary: pd.DataFrame
    run: dict[str, Any] = field(default_factory=dict)

    def write(self, out_dir: str | Path) -> list[Path]:
        """compare_layers.csv, compare_experts.csv and run.json (with ``compare_summary``), swapped in as one set."""

        def write_all(out: Path) -> list[Path]:
            return [
                write_csv(self.layers, out / "compare_layers.csv"),
                write_csv(self.experts, out / "compare_experts.csv"),
                write_json(self.run, out / "run.json"),
            ]

        return replace_folder(out_dir, write_all)


def _frames(comparer: _Comparer) -> tuple[pd.DataFrame, pd.DataFrame]:
    layer_rows = []
    expert_parts = []
    for spec in comparer.routers:
        state = comparer.state.get(spec.index)
        if state is None:
            continue
        s = dict(zip(_SUMS, state.sums.cpu().tolist(), strict=True))
        tokens = max(state.tokens, 1)
        e, k = spec.num_experts, spec.top_k
        count_a, count_b = state.count_a.cpu().numpy()[:e], state.count_b.cpu().numpy()[:e]
        share_a = count_a / max(state.tokens * k, 1)
        share_b = count_b / max(state.tokens * k, 1)
        kept = state.tokens - s["changed"]
        layer_rows.append(
            {
                "layer": spec.layer,
                "tokens": state.tokens,
                "first_choice_agreement": s["first"] / tokens,
                "topk_overlap": s["overlap"] / tokens,
                "topk_jaccard": s["jaccard"] / tokens,
                "exact_set_agreement": s["exact"] / tokens,
                "weight_overlap": s["weight_overlap"] / tokens,
                "routing_js": s["js"] / tokens,
                "load_tv": metrics.total_variation(count_a, count_b) if count_a.sum() and count_b.sum() else np.nan,
                "load_js": metrics.load_js(count_a, count_b) if count_a.sum() and count_b.sum() else np.nan,
                "margin_changed": s["margin_changed"] / s["changed"] if s["changed"] else np.nan,
                "margin_kept": s["margin_kept"] / kept if kept else np.nan,
            }
        )
        expert_parts.append(
            pd.DataFrame(
                {
                    "layer": spec.layer,
                    "expert": np.arange(e),
                    "count_a": count_a,
                    "count_b": count_b,
                    "share_a": share_a,
                    "share_b": share_b,
                    "share_diff": share_b - share_a,
                    "log2_ratio": metrics.log2_ratio(share_a, share_b),
                }
            )
        )
    layers = pd.DataFrame(layer_rows, columns=schemas.COMPARE_LAYERS.names).astype(schemas.COMPARE_LAYERS.dtypes)
    experts = (
        pd.concat(expert_parts, ignore_index=True)
        if expert_parts
        else pd.DataFrame(columns=schemas.COMPARE_EXPERTS.names)
    )
    return layers, experts[schemas.COMPARE_EXPERTS.names].astype(schemas.COMPARE_EXPERTS.dtypes)


def _summary(comparer: _Comparer, layers: pd.DataFrame, mode: str, record_bytes: int | None) -> dict[str, Any]:
    out = comparer.out_sums.cpu().tolist() if comparer.out_sums is not None else [0.0, 0.0]
    positions = comparer.positions
    tokens = int(layers["tokens"].max()) if len(layers) else 0
    worst = layers.loc[layers["first_choice_agreement"].idxmin()] if len(layers) else None
    return {
        "tokens": tokens,
        "predicted_positions": positions,
        "top1_agreement": out[0] / positions if positions else float("nan"),
        "output_kl": out[1] / positions if positions else float("nan"),
        "kl_support": KL_SUPPORT,
        "first_choice_agreement": float(layers["first_choice_agreement"].mean()) if len(layers) else float("nan"),
        "routing_js": float(layers["routing_js"].mean()) if len(layers) else float("nan"),
        "worst_layer": int(worst["layer"]) if worst is not None else -1,
        "worst_first_choice_agreement": float(worst["first_choice_agreement"]) if worst is not None else float("nan"),
        "mode": mode,
        "record_bytes": record_bytes,
        "record_bytes_per_token": record_bytes / tokens if record_bytes is not None and tokens else None,
    }


def _report(comparer: _Comparer, mode: str, record_bytes: int | None, run: dict[str, Any]) -> CompareReport:
    layers, experts = _frames(comparer)
    summary = _summary(comparer, layers, mode, record_bytes)
    frame = pd.DataFrame([summary], columns=schemas.COMPARE_SUMMARY.names).astype(schemas.COMPARE_SUMMARY.dtypes)
    return CompareReport(layers, experts, frame, {**run, "compare_summary": summary})


# ------------------------------------------------------------------------------------------------------------
# the two modes
# ------------------------------------------------------------------------------------------------------------

Progress = Callable[[str, int], None]  # (phase "a" | "b" | "both", tokens in the batch just done)


def _environment() -> dict[str, Any]:
    from moe_inspect.balance import package_versions

    return {"packages": package_versions(), "python": platform.python_version(), "platform": platform.platform()}


def describe_model(loaded: LoadedModel) -> dict[str, Any]:
    return {
        "model": loaded.model_id,
        "model_type": loaded.model_type,
        "revision": loaded.revision,
        "dtype": loaded.dtype,
        "device": loaded.device,
        "quantization": loaded.quantization,
        "routers": [spec.describe() for spec in loaded.routers],
    }


def _free() -> None:
    """Return a dropped model's memory now, before the next one loads."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _with_per_token(comparer: _Comparer, per_token: PerTokenSink | None, record: BatchRecord) -> None:
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
        # Shapes only: a RouterSpec holds its module, which would keep model A's router weights alive.
        routers_a = [replace(spec, module=None, selection_module=None) for spec in loaded.routers]
        describe_a = describe_model(loaded)
        tokens = 0
        try:
            head = OutputHead(loaded.model)
            recorder = _Recorder(loaded.routers)
            with torch.inference_mode(), capture(loaded.routers, sink=recorder, keep=False):
                for batch in distributed.shard(batches):  # under torchrun: this rank's share
                    store.append(_run_a(loaded, head, recorder, batch).to_host())
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
        comparer = _Comparer(loaded_b.routers, keep_b=per_token is not None)
        done = done_tokens = 0
        try:
            with torch.inference_mode(), capture(loaded_b.routers, sink=comparer, keep=False):
                for record in store:
                    _run_b(loaded_b, head, comparer, record)
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
            **_environment(),
            **(run_info or {}),
        }
        return _report(comparer, "two-pass", record_bytes, run)


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
    check_same_moe(loaded_a.routers, loaded_b.routers)
    started = time.perf_counter()
    head_a, head_b = OutputHead(loaded_a.model), OutputHead(loaded_b.model)
    recorder = _Recorder(loaded_a.routers)
    comparer = _Comparer(loaded_b.routers, keep_b=per_token is not None)
    batches_done = tokens = 0
    try:
        with torch.inference_mode():
            # Captures are per batch and per model, so a model compared with itself is never hooked twice at once.
            for batch in distributed.shard(batches):  # under torchrun: this rank's share
                with capture(loaded_a.routers, sink=recorder, keep=False):
                    record = _run_a(loaded_a, head_a, recorder, batch)
                with capture(loaded_b.routers, sink=comparer, keep=False):
                    comparer.begin(record, loaded_b.input_device)
                    decoded = _decode(loaded_b, head_b, batch.input_ids, batch.attention_mask)
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
        **_environment(),
        **(run_info or {}),
    }
    return _report(comparer, "together", None, run)
