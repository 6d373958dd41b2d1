"""Model A's compact per-token record for ``compare``: what comparing with model B needs, on disk, batch by batch.

``compare`` never holds both models: A runs over the corpus first and leaves this record, then B streams over the
same batches and is compared against it. Per real token and MoE router the record keeps the k expert ids (int16),
the k combine weights (float16) and the full routing distribution over the router's C columns (float16, for the
Jensen-Shannon divergence); per predicted position A's top-64 output log-probabilities (float32) with their ids
(int32) and the log of the remaining mass; per batch the token ids and mask, so B sees exactly the same tokens.
So a token costs ``sum over routers (4k + 2C) + 5 + 516`` bytes: 1,289 for Mixtral-8x7B (32 routers, E = 8,
k = 2), 32,073 for DeepSeek-V3 (58 routers, E = 256, k = 8), whose distribution term dominates.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from moe_inspect.model.routers import RouterSpec

#: Output log-probabilities kept per predicted position: A's top tokens, the KL's support with one "rest" bucket.
OUTPUT_TOP = 64
PROB_DTYPE = torch.float16
WEIGHT_DTYPE = torch.float16


def expert_dtype(spec: RouterSpec) -> torch.dtype:
    return torch.int16 if spec.num_columns < 2**15 else torch.int32


def bytes_per_token(routers: Sequence[RouterSpec], output_top: int = OUTPUT_TOP) -> int:
    """Disk bytes one token costs in the record (the module docstring's formula)."""
    routing = sum(
        spec.top_k * (expert_dtype(spec).itemsize + 2) + 2 * distribution_width(spec) for spec in routers
    )
    return routing + 4 + 1 + output_top * 8 + 4


def distribution_width(spec: RouterSpec) -> int:
    """Columns of the family's routing distribution (Doge: its sqrt(E) x sqrt(E) key pairs, i.e. E)."""
    return spec.num_experts if spec.scoring == "product_key" else spec.num_columns


@dataclass
class BatchRecord:
    """One batch of model A: token ids and mask, then per router and per output position what B is compared to."""

    input_ids: torch.Tensor  # (B, S) int32
    attention_mask: torch.Tensor  # (B, S) int8
    experts: list[torch.Tensor]  # per router (T_real, k), int16/int32
    weights: list[torch.Tensor]  # per router (T_real, k) float16
    probs: list[torch.Tensor]  # per router (T_real, C) float16
    out_logp: torch.Tensor  # (N, OUTPUT_TOP) float32, A's top log-probs at predicted positions
    out_ids: torch.Tensor  # (N, OUTPUT_TOP) int32
    out_rest: torch.Tensor  # (N,) float32 log of A's mass outside its top tokens

    def to(self, device: torch.device) -> BatchRecord:
        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(device, non_blocking=True)

        return BatchRecord(
            move(self.input_ids),
            move(self.attention_mask),
            [move(t) for t in self.experts],
            [move(t) for t in self.weights],
            [move(t) for t in self.probs],
            move(self.out_logp),
            move(self.out_ids),
            move(self.out_rest),
        )

    def to_host(self) -> BatchRecord:
        """One device-to-host copy per field group (same-shaped routers are stacked first), not one per router."""
        return BatchRecord(
            self.input_ids.cpu(),
            self.attention_mask.cpu(),
            host_list(self.experts),
            host_list(self.weights),
            host_list(self.probs),
            self.out_logp.cpu(),
            self.out_ids.cpu(),
            self.out_rest.cpu(),
        )


def host_list(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    if not tensors:
        return []
    if all(t.shape == tensors[0].shape and t.device == tensors[0].device for t in tensors):
        return list(torch.stack(tensors).cpu().unbind(0))
    return [t.cpu() for t in tensors]


class RecordStore:
    """A scratch folder of ``batch_NNNNNN.pt`` files, removed when closed (also after errors and Ctrl-C)."""

    def __init__(self, parent: str | Path | None = None) -> None:
        if parent is not None:
            Path(parent).mkdir(parents=True, exist_ok=True)
        self.path = Path(tempfile.mkdtemp(prefix="moe-inspect-compare-", dir=parent))
        self.batches = 0
        self.bytes = 0

    def append(self, record: BatchRecord) -> None:
        target = self.path / f"batch_{self.batches:06d}.pt"
        torch.save(record.__dict__, target)
        self.batches += 1
        self.bytes += target.stat().st_size

    def __iter__(self) -> Iterator[BatchRecord]:
        for index in range(self.batches):
            data = torch.load(self.path / f"batch_{index:06d}.pt", weights_only=True)
            yield BatchRecord(**data)

    def close(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    def __enter__(self) -> RecordStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
