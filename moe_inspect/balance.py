"""Run a corpus through the model with the balance accumulator hooked in, and package the result."""

from __future__ import annotations

import platform
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from moe_inspect.accumulate import BalanceAccumulator
from moe_inspect.analysis import distributed
from moe_inspect.capture import capture
from moe_inspect.corpus import Batch
from moe_inspect.errors import UserError
from moe_inspect.export import replace_folder, write_csv, write_json
from moe_inspect.loading import LoadedModel
from moe_inspect.schemas import DEFAULT_CAPACITY_FACTORS
from moe_inspect.tables import coactivation_frame, experts_frame, layers_frame

_PACKAGES = ("moe-inspect", "torch", "transformers", "accelerate", "tokenizers", "bitsandbytes", "pandas")

Progress = Callable[[Batch], None]


@dataclass
class BalanceReport:
    """Per-layer, per-expert and co-activation tables plus what was run (``run``, written as run.json)."""

    layers: pd.DataFrame
    experts: pd.DataFrame
    coactivation: pd.DataFrame | None  # None where the source has no per-token ids (engine count records)
    run: dict[str, Any] = field(default_factory=dict)

    @property
    def partial(self) -> bool:
        return bool(self.run.get("partial"))

    def write(self, out_dir: str | Path) -> list[Path]:
        """layers.csv, experts.csv, coactivation.csv (when known) and run.json, swapped in as one set.

        Without co-activation, a coactivation.csv left by an earlier run is dropped rather than carried over.
        """

        def write_all(out: Path) -> list[Path]:
            written = [write_csv(self.layers, out / "layers.csv"), write_csv(self.experts, out / "experts.csv")]
            if self.coactivation is not None:
                written.append(write_csv(self.coactivation, out / "coactivation.csv"))
            return [*written, write_json(self.run, out / "run.json")]

        return replace_folder(out_dir, write_all, replaces=("coactivation.csv",))


def check_capacity_factors(factors: tuple[float, ...]) -> tuple[float, ...]:
    """Capacity ceil(cf * T * k / E) is meaningless at cf <= 0 (every assignment dropped): refuse it."""
    bad = [f for f in factors if not f > 0]  # also NaN
    if bad:
        raise UserError(f"A capacity factor must be positive, not {', '.join(f'{f:g}' for f in bad)}.")
    return tuple(factors)


def package_versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for name in _PACKAGES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def run_balance(
    loaded: LoadedModel,
    batches: Iterable[Batch],
    capacity_factors: tuple[float, ...] = DEFAULT_CAPACITY_FACTORS,
    progress: Progress | None = None,
    run_info: dict[str, Any] | None = None,
) -> BalanceReport:
    """Stream ``batches`` through the model; Ctrl-C stops early and returns what was accumulated (partial)."""
    accumulator = BalanceAccumulator(loaded.routers, check_capacity_factors(capacity_factors))
    batches = distributed.shard(batches)  # under torchrun: this rank's batches only (no-op in one process)
    device = loaded.input_device
    tokens = 0
    partial = False
    started = time.perf_counter()
    try:
        with torch.inference_mode(), capture(loaded.routers, sink=accumulator, keep=False):
            for batch in batches:
                accumulator.begin_batch(batch.attention_mask)
                # Positions count real tokens only, so left padding also works for absolute position embeddings.
                positions = (batch.attention_mask.cumsum(-1) - 1).clamp_min(0)
                loaded.model(
                    input_ids=batch.input_ids.to(device, non_blocking=True),
                    attention_mask=batch.attention_mask.to(device, non_blocking=True),
                    position_ids=positions.to(device, non_blocking=True),
                    use_cache=False,
                )
                tokens += batch.tokens
                if progress is not None:
                    progress(batch)
    except KeyboardInterrupt:
        partial = True
    elapsed = time.perf_counter() - started
    tokens = distributed.reduce_accumulator(accumulator, tokens)  # under torchrun: every rank's sums, once
    totals = accumulator.finish()
    run = {
        "model": loaded.model_id,
        "model_type": loaded.model_type,
        "revision": loaded.revision,
        "dtype": loaded.dtype,
        "device": loaded.device,
        "quantization": loaded.quantization,
        "tokens": tokens,
        "batches": accumulator.batches,
        "capacity_factors": list(capacity_factors),
        "elapsed_s": round(elapsed, 3),
        "tokens_per_s": round(tokens / elapsed, 1) if elapsed > 0 else None,
        "partial": partial,  # Ctrl-C: an interrupted batch may be counted by its first routers only
        "routers": [spec.describe() for spec in loaded.routers],
        "packages": package_versions(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        **(run_info or {}),
    }
    return BalanceReport(
        layers=layers_frame(totals, capacity_factors),
        experts=experts_frame(totals),
        coactivation=coactivation_frame(totals),
        run=run,
    )
