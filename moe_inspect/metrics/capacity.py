"""Per-batch expert counting, and capacity / token dropping as capacity-limited engines would apply it."""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Literal

import torch

from moe_inspect.metrics._common import _check_experts_2d, _counts_into

# ----------------------------------------------------------------------------------------------------------
# counting (per batch, on device)
# ----------------------------------------------------------------------------------------------------------


def expert_counts(experts: torch.Tensor, num_columns: int) -> torch.Tensor:
    """``bincount`` of all ranks of ``experts [T, k]`` with ``minlength=num_columns`` (int64, on device, no
    sync). Ids outside ``[0, num_columns)`` are ignored."""
    return _counts_into(experts, num_columns)


def first_choice_counts(experts: torch.Tensor, num_columns: int) -> torch.Tensor:
    """Counts of the rank-0 expert only (Mixtral paper Fig. 9's first choice); ``experts`` is ``[T, k]``."""
    return _counts_into(_check_experts_2d(experts)[:, 0], num_columns)


# ----------------------------------------------------------------------------------------------------------
# capacity and token dropping
# ----------------------------------------------------------------------------------------------------------


def expert_capacity(tokens: int, k: int, num_experts: int, capacity_factor: float) -> int:
    """Expert capacity ``C = ceil(capacity_factor * T * k / E)`` (Switch / GShard / DeepSpeed).

    Computed exactly from the decimal value of ``capacity_factor`` (``Fraction(str(cf))``), so cf=1.1 with
    T=45, k=2, E=3 gives 33, where the float product ``33.00000000000001`` would ceil to 34.
    """
    cf = Fraction(str(capacity_factor))
    if cf < 0:
        raise ValueError(f"capacity_factor must be >= 0, got {capacity_factor}")
    return math.ceil(cf * int(tokens) * int(k) / int(num_experts))


def dropped_assignments(
    experts: torch.Tensor, num_experts: int, capacity_factor: float, capacity: int | None = None
) -> torch.Tensor:
    """Assignments dropped by capacity ``C`` in one batch: ``sum_e max(0, n_e - C)`` (int64 scalar on device).

    ``experts [T, k]`` holds the batch's real tokens in batch order; ``C = expert_capacity(T, k, E, cf)`` from
    this batch's T unless ``capacity`` is given. Under the "position" policy (Switch, GShard) assignment
    ``(t, r)`` is kept iff the assignments to the same expert at earlier tokens (any rank) number fewer than
    ``C`` -- ranks of one token are processed at the same position, and top-k never repeats an expert within
    a token. Each expert therefore keeps its first ``C`` assignments and drops the rest, so the *count* is
    ``max(0, n_e - C)`` for any policy (``capacity_keep_mask`` says *which* are dropped). Ids outside
    ``[0, E)`` (null experts) have no capacity and are never dropped. Drop rate = this / (T*k).
    """
    experts = _check_experts_2d(experts)
    t, k = experts.shape
    cap = expert_capacity(t, k, num_experts, capacity_factor) if capacity is None else int(capacity)
    n = _counts_into(experts, num_experts)
    return (n - cap).clamp_min(0).sum()


def capacity_keep_mask(
    experts: torch.Tensor,
    num_experts: int,
    capacity_factor: float,
    capacity: int | None = None,
    policy: Literal["position", "probs"] = "position",
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Bool ``[T, k]``: which assignments survive capacity ``C`` (see ``dropped_assignments``).

    ``position``: earlier tokens win (Switch, GShard), ranks of one token at the same position. ``probs``:
    per expert the ``C`` highest ``weights [T, k]`` win, ties to the earlier token (Megatron's
    ``moe_token_drop_policy="probs"``). Vectorised by a stable sort on the expert id, O(T*k) memory rather
    than the ``[T*k, E]`` of a one-hot cumsum; a slot's queue position is its index minus its group start.
    """
    experts = _check_experts_2d(experts)
    t, k = experts.shape
    cap = expert_capacity(t, k, num_experts, capacity_factor) if capacity is None else int(capacity)
    flat = experts.reshape(-1).long()
    valid = (flat >= 0) & (flat < num_experts)
    key = torch.where(valid, flat, num_experts)
    if policy == "position":
        order = torch.sort(key, stable=True).indices
    elif policy == "probs":
        if weights is None or weights.shape != experts.shape:
            raise ValueError("policy='probs' needs weights with the same [T, k] shape as experts")
        by_weight = torch.sort(weights.reshape(-1).float(), descending=True, stable=True).indices
        order = by_weight[torch.sort(key[by_weight], stable=True).indices]
    else:
        raise ValueError(f"unknown drop policy {policy!r}; expected 'position' or 'probs'")
    sizes = torch.zeros(num_experts + 1, dtype=torch.int64, device=flat.device)
    sizes.scatter_add_(0, key, torch.ones_like(key))
    starts = torch.cumsum(sizes, 0) - sizes
    queue_sorted = torch.arange(flat.numel(), device=flat.device) - starts[key[order]]
    queue = torch.empty_like(queue_sorted).scatter_(0, order, queue_sorted)
    return ((queue < cap) | ~valid).reshape(t, k)
