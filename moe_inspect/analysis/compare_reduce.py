"""Data-parallel ``compare`` under torchrun: every rank's per-router sums added up once, at the end.

Each rank compares its share of the batches (``distributed.shard``), so the sums of all ranks are the sums of one
process over every batch: counts exactly, float sums to rounding. A rank that compared no batch has no sums yet:
it learns from the others which routers ran and contributes zeros. Outside a launcher this is a no-op.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from moe_inspect.analysis import distributed

if TYPE_CHECKING:
    from moe_inspect.analysis.compare_batch import Comparer


def reduce_comparer(comparer: Comparer, *counts: int) -> tuple[int, ...]:
    """Sum every rank's ``comparer`` sums into every rank's (in place); returns ``counts`` summed over ranks too."""
    if not (distributed.enabled() and torch.distributed.is_initialized()):
        return counts
    from moe_inspect.analysis.compare_batch import _RouterSums
    from moe_inspect.analysis.compare_report import SUMS

    with torch.inference_mode():  # the sums are inference tensors: update them in the mode they were made in
        routers = comparer.routers
        ran = torch.tensor([spec.index in comparer.state for spec in routers] + [comparer.out_sums is not None])
        (ran,) = distributed.sum_over_ranks([ran.long()])
        for spec, flag in zip(routers, ran.tolist(), strict=False):
            if flag and spec.index not in comparer.state:
                c = spec.num_columns
                zeros = torch.zeros(c, dtype=torch.int64)
                comparer.state[spec.index] = _RouterSums(
                    torch.zeros(len(SUMS), dtype=torch.float64), zeros, zeros.clone()
                )
        if ran[-1] and comparer.out_sums is None:
            comparer.out_sums = torch.zeros(2, dtype=torch.float64)
        states = [comparer.state[spec.index] for spec in routers if spec.index in comparer.state]
        tensors = [torch.tensor([*counts, comparer.positions, *(s.tokens for s in states)], dtype=torch.int64)]
        for s in states:
            tensors += [s.sums, s.count_a, s.count_b]
        if comparer.out_sums is not None:
            tensors.append(comparer.out_sums)
        summed = distributed.sum_over_ranks(tensors)
        head = summed[0].tolist()
        for i, s in enumerate(states):
            s.sums, s.count_a, s.count_b = summed[1 + 3 * i : 4 + 3 * i]
            s.tokens = int(head[len(counts) + 1 + i])
        if comparer.out_sums is not None:
            comparer.out_sums = summed[-1]
        comparer.positions = int(head[len(counts)])
        return tuple(int(v) for v in head[: len(counts)])
