"""Run a corpus through the model with the balance accumulator hooked in, and package the result."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from moe_inspect.analysis import distributed
from moe_inspect.analysis.accumulate import BalanceAccumulator, sum_totals
from moe_inspect.analysis.batching import BatchMemory
from moe_inspect.analysis.encoder_decoder import decoder_inputs
from moe_inspect.analysis.interrupts import interrupts_deferred
from moe_inspect.analysis.modality import ModalitySplit, load_distance
from moe_inspect.analysis.routing_pass import routing_forward
from moe_inspect.analysis.run_info import environment, model_identity
from moe_inspect.analysis.run_info import package_versions as package_versions
from moe_inspect.analysis.tables import coactivation_frame, experts_frame, layers_frame
from moe_inspect.analysis.token_counts import TokenCounter, expert_tokens_frame, fan_out, vocab_frame
from moe_inspect.errors import UserError
from moe_inspect.io.corpus import Batch
from moe_inspect.io.export import replace_folder, write_csv, write_json
from moe_inspect.io.schemas import DEFAULT_CAPACITY_FACTORS
from moe_inspect.model.capture import capture
from moe_inspect.model.loading import LoadedModel
from moe_inspect.model.quantize import no_grad_context

Progress = Callable[[Batch], None]


@dataclass
class BalanceReport:
    """Per-layer, per-expert and co-activation tables plus what was run (``run``, written as run.json)."""

    layers: pd.DataFrame
    experts: pd.DataFrame
    coactivation: pd.DataFrame | None  # None where the source has no per-token ids (engine count records)
    run: dict[str, Any] = field(default_factory=dict)
    expert_tokens: pd.DataFrame | None = None  # with top_tokens: schemas.EXPERT_TOKENS

    @property
    def partial(self) -> bool:
        return bool(self.run.get("partial"))

    def write(self, out_dir: str | Path) -> list[Path]:
        """layers.csv, experts.csv, coactivation.csv (when known), expert_tokens.csv (with top_tokens) and
        run.json, swapped into ``out_dir`` as one set.

        Without co-activation, a coactivation.csv left by an earlier run is dropped rather than carried over.
        """

        def write_all(out: Path) -> list[Path]:
            written = [write_csv(self.layers, out / "layers.csv"), write_csv(self.experts, out / "experts.csv")]
            if self.coactivation is not None:
                written.append(write_csv(self.coactivation, out / "coactivation.csv"))
            if self.expert_tokens is not None:
                written.append(write_csv(self.expert_tokens, out / "expert_tokens.csv"))
            return [*written, write_json(self.run, out / "run.json")]

        return replace_folder(out_dir, write_all, replaces=("coactivation.csv",))


def check_capacity_factors(factors: tuple[float, ...]) -> tuple[float, ...]:
    """Capacity ceil(cf * T * k / E) is meaningless at cf <= 0 (every assignment dropped): refuse it."""
    bad = [f for f in factors if not f > 0]  # also NaN
    if bad:
        raise UserError(f"A capacity factor must be positive, not {', '.join(f'{f:g}' for f in bad)}.")
    return tuple(factors)


def _route(
    loaded: LoadedModel,
    accumulator: BalanceAccumulator | ModalitySplit,
    counter: TokenCounter | None,
    memory: BatchMemory,
    batches: Iterable[Batch],
    progress: Progress | None,
) -> tuple[int, bool]:
    """Stream ``batches`` into ``accumulator`` (and ``counter``): (real tokens routed, whether Ctrl-C stopped it).

    A batch is committed to both only after its forward finished, so Ctrl-C leaves exactly the finished batches.
    """
    device = loaded.input_device
    tokens = 0
    try:
        with no_grad_context(loaded.model), capture(loaded.routers, sink=fan_out(accumulator, counter), keep=False):
            for batch in batches:
                decoder = decoder_inputs(loaded, batch) if loaded.is_seq2seq else None
                if isinstance(accumulator, ModalitySplit):
                    accumulator.begin_batch(batch.attention_mask, batch.modality)
                else:
                    accumulator.begin_batch(batch.attention_mask, None if decoder is None else decoder[1])
                if counter is not None:
                    counter.begin_batch(batch.input_ids, batch.attention_mask)
                memory.start()
                extra: dict[str, torch.Tensor]
                if decoder is not None:  # encoder over the sources, decoder over the start token or targets
                    extra = {
                        "decoder_input_ids": decoder[0].to(device, non_blocking=True),
                        "decoder_attention_mask": decoder[1].to(device, non_blocking=True),
                    }
                elif batch.model_inputs is not None:
                    # Image batches leave positions to the model (multimodal RoPE derives them from the image grid).
                    extra = {name: value.to(device) for name, value in batch.model_inputs.items()}
                else:
                    # Positions count real tokens only, so left padding also works for absolute position embeddings.
                    positions = (batch.attention_mask.cumsum(-1) - 1).clamp_min(0)
                    extra = {"position_ids": positions.to(device, non_blocking=True)}
                routing_forward(
                    loaded,
                    batch.input_ids.to(device, non_blocking=True),
                    batch.attention_mask.to(device, non_blocking=True),
                    **extra,
                )
                with interrupts_deferred():  # the batch counts in every table, or (Ctrl-C before here) in none
                    accumulator.end_batch()
                    if counter is not None:
                        counter.end_batch()
                    tokens += batch.tokens
                memory.stop()
                if progress is not None:
                    progress(batch)
    except KeyboardInterrupt:
        return tokens, True
    return tokens, False


def _with_source(blocks: list[tuple[str, pd.DataFrame]], column: str = "source") -> pd.DataFrame:
    """Stack per-source (or per-modality) tables with a leading ``column``."""
    frame = pd.concat([table.assign(**{column: name}) for name, table in blocks], ignore_index=True)
    return frame[[column, *frame.columns[:-1]]]


def run_balance(
    loaded: LoadedModel,
    batches: Iterable[Batch],
    capacity_factors: tuple[float, ...] = DEFAULT_CAPACITY_FACTORS,
    progress: Progress | None = None,
    run_info: dict[str, Any] | None = None,
    top_tokens: int = 0,
    min_count: int = 5,
    token_layers: Iterable[int] | None = None,
    sources: Sequence[tuple[str, Iterable[Batch]]] | None = None,
    by_modality: bool = False,
) -> BalanceReport:
    """Stream ``batches`` through the model; Ctrl-C stops early and returns what was accumulated (partial).

    With ``sources`` (name, batches) instead, each source is accumulated on its own and the tables get a
    ``source`` column: one block of rows per source, then ``all`` (their sums, which equal one run over all).
    ``top_tokens`` > 0 also counts token ids per expert (``analysis.token_counts``) for ``expert_tokens``, over
    the whole corpus, in the decoder layers ``token_layers`` (default all MoE layers).
    ``by_modality`` (image batches: ``analysis.modality``) splits the same way by each token's ``modality`` in one
    pass: a block per modality present, then ``all``; layers gain ``image_text_tv`` (``modality.load_distance``).
    """
    capacity_factors = check_capacity_factors(capacity_factors)
    counter = TokenCounter(loaded.routers, token_layers, len(loaded.tokenizer)) if top_tokens > 0 else None
    streams = list(sources) if sources is not None else [("all", batches)]
    memory = BatchMemory(loaded)
    accumulators: list[tuple[str, BalanceAccumulator]] = []
    tokens = 0
    partial = False
    started = time.perf_counter()
    split = ModalitySplit(loaded.routers, capacity_factors, loaded.model.config) if by_modality else None
    for name, stream in streams:
        accumulator = BalanceAccumulator(loaded.routers, capacity_factors)
        # Under torchrun each rank routes its own share of the batches and the sums are reduced once at the end.
        done, partial = _route(loaded, split or accumulator, counter, memory, distributed.shard(stream), progress)
        accumulators.append((name, split.all if split else accumulator))
        for part in split.parts.values() if split else ():
            distributed.reduce_accumulator(part, 0)
        tokens += distributed.reduce_accumulator(split.all if split else accumulator, done)
        if partial:
            break
    elapsed = time.perf_counter() - started
    per_source = split.blocks() if split else [(name, acc.finish()) for name, acc in accumulators]
    blocks = per_source if sources is None else [*per_source, ("all", sum_totals([t for _, t in per_source]))]
    run = {
        **model_identity(loaded),
        "tokens": tokens,
        "batches": sum(acc.batches for _, acc in accumulators),
        "capacity_factors": list(capacity_factors),
        "elapsed_s": round(elapsed, 3),
        "tokens_per_s": round(tokens / elapsed, 1) if elapsed > 0 else None,
        "peak_batch_memory_bytes": memory.peak_bytes,  # the largest any one batch added, see the method
        "peak_batch_memory_method": memory.method,
        "partial": partial,  # Ctrl-C: the figures cover the batches that finished, in every table
        "routers": [spec.describe() for spec in loaded.routers],
        **environment(),
        **(run_info or {}),
    }
    if sources is not None:
        run["sources"] = [name for name, _ in per_source]
    coactivation = coactivation_frame(blocks[-1][1])  # over everything routed ('all' with sources)
    if split is not None:
        run["modalities"] = [name for name, _ in blocks[:-1]]
        layers = _with_source([(name, layers_frame(t, capacity_factors)) for name, t in blocks], "modality")
        experts = _with_source([(name, experts_frame(t)) for name, t in blocks], "modality")
        layers = layers.merge(load_distance(blocks).rename(columns={"tv": "image_text_tv"}), on=["layer", "router"],
                              how="left")
    elif sources is None:
        layers, experts = layers_frame(blocks[0][1], capacity_factors), experts_frame(blocks[0][1])
    else:
        layers = _with_source([(name, layers_frame(t, capacity_factors)) for name, t in blocks])
        experts = _with_source([(name, experts_frame(t)) for name, t in blocks])
    report = BalanceReport(layers=layers, experts=experts, coactivation=coactivation, run=run)
    if counter is not None:
        token_totals = counter.finish()  # over the whole corpus, also with sources
        report.layers = report.layers.merge(vocab_frame(token_totals), on=["layer", "router"], how="left")
        report.expert_tokens = expert_tokens_frame(
            token_totals, lambda i: loaded.tokenizer.decode([i]), top_tokens, min_count
        )
        run.update(top_tokens=top_tokens, min_count=min_count)
    return report
