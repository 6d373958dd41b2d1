"""Locality (consecutive-token repeats), co-activation, transitions and vocabulary specialisation."""

from __future__ import annotations

import math

import numpy as np
import torch

from moe_inspect.metrics._common import ArrayLike, _check_experts_2d, _float_on_device

# ----------------------------------------------------------------------------------------------------------
# locality
# ----------------------------------------------------------------------------------------------------------


def _pair_hits(prev: torch.Tensor, nxt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For ``[..., k]`` expert sets at positions i and i+1: same rank-0 expert, and intersecting sets."""
    same_first = prev[..., 0] == nxt[..., 0]
    overlap = (prev.unsqueeze(-1) == nxt.unsqueeze(-2)).flatten(-2).any(-1)
    return same_first, overlap


def repeat_counts(experts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Consecutive-token repeats in ONE sequence (Mixtral paper, Table 5): ``experts [S, k]`` of its real
    tokens in order. Returns int64 device scalars ``(first_same, any_overlap, pairs)``: the pairs ``(i, i+1)``
    with the same rank-0 expert, with intersecting top-k sets, and ``S - 1``. Rates = counts / pairs."""
    experts = _check_experts_2d(experts)
    same_first, overlap = _pair_hits(experts[:-1], experts[1:])
    pairs = torch.full((), max(experts.shape[0] - 1, 0), dtype=torch.int64, device=experts.device)
    return same_first.sum(), overlap.sum(), pairs


def repeat_counts_batched(experts: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``repeat_counts`` summed over a padded batch ``experts [B, S, k]``, ``mask [B, S]`` (1 = real token).

    A pair ``(i, i+1)`` counts only if both positions are real, so pairs never cross padding; with left or
    right padding the real tokens of a row are contiguous and this equals ``repeat_counts`` per row.
    """
    if experts.dim() == 2:
        experts = experts.unsqueeze(-1)
    m = mask.to(device=experts.device, dtype=torch.bool)
    both = m[:, :-1] & m[:, 1:]
    same_first, overlap = _pair_hits(experts[:, :-1], experts[:, 1:])
    return (same_first & both).sum(), (overlap & both).sum(), both.sum()


def random_repeat_baselines(num_experts: int, k: int) -> tuple[float, float]:
    """Repeat rates of independent uniform routing: ``1/E`` (same first choice) and ``1 - C(E-k, k)/C(E, k)``
    (top-k sets intersect). Mixtral E=8, k=2: 0.125 and 0.4643 (the paper's 46.4%)."""
    if not 0 < k <= num_experts:
        raise ValueError(f"need 0 < k <= E, got k={k}, E={num_experts}")
    return 1.0 / num_experts, 1.0 - math.comb(num_experts - k, k) / math.comb(num_experts, k)


# ----------------------------------------------------------------------------------------------------------
# co-activation, transitions, specialisation
# ----------------------------------------------------------------------------------------------------------


def coactivation_counts(experts: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Symmetric int64 ``[E, E]``: ``N[i, j]`` = tokens whose top-k contains both ``i`` and ``j`` (OLMoE).

    Equal to ``onehot.T @ onehot`` with the diagonal zeroed (``onehot [T, E]`` of each token's set), but
    computed by scattering the ``k*(k-1)`` ordered rank pairs of every token into ``E*E`` bins: exact int64
    (no float/TF32 matmul) and ``O(T*k^2)`` memory instead of ``O(T*E)``. Pairs involving ids outside
    ``[0, E)`` (null experts) are ignored. Assumes distinct ids per token, as top-k guarantees.
    """
    experts = _check_experts_2d(experts).long()
    a, b = experts.unsqueeze(-1), experts.unsqueeze(-2)  # [T, k, 1], [T, 1, k]
    valid = (a >= 0) & (a < num_experts) & (b >= 0) & (b < num_experts) & (a != b)
    key = torch.where(valid, a * num_experts + b, num_experts * num_experts).reshape(-1)
    out = torch.zeros(num_experts * num_experts + 1, dtype=torch.int64, device=experts.device)
    out.scatter_add_(0, key, torch.ones_like(key))
    return out[:-1].reshape(num_experts, num_experts)


def coactivation_share(coact: ArrayLike, n: ArrayLike) -> torch.Tensor:
    """OLMoE co-activation ``N[i, j] / N[i]``: the share of tokens routed to ``i`` that also use ``j``.

    ``n`` are the per-expert token counts (``expert_counts``). Rows sum to ``k - 1`` without null experts.
    Rows of unused experts are 0 (not NaN) since nothing was co-activated.
    """
    c = _float_on_device(coact)
    d = _float_on_device(n).to(c.device)
    return torch.where(d.unsqueeze(-1) > 0, c / d.clamp_min(1).unsqueeze(-1), torch.zeros_like(c))


def transition_counts(
    experts_a: torch.Tensor, experts_b: torch.Tensor, num_experts_a: int, num_experts_b: int
) -> torch.Tensor:
    """Cross-layer transitions (OLMoE): int64 ``[E_a, E_b]`` counts of (expert at layer a, expert at layer b)
    for the same token. ``[T]`` inputs (e.g. rank-0 choices) count one pair per token; ``[T, k_a]`` and
    ``[T, k_b]`` count all ``k_a*k_b`` pairs. Ids out of range are ignored."""
    a = _check_experts_2d(experts_a, "experts_a").long().unsqueeze(-1)
    b = _check_experts_2d(experts_b, "experts_b").long().unsqueeze(-2)
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"token counts differ: {a.shape[0]} vs {b.shape[0]}")
    size = num_experts_a * num_experts_b
    valid = (a >= 0) & (a < num_experts_a) & (b >= 0) & (b < num_experts_b)
    key = torch.where(valid, a * num_experts_b + b, size).reshape(-1)
    out = torch.zeros(size + 1, dtype=torch.int64, device=a.device)
    out.scatter_add_(0, key, torch.ones_like(key))
    return out[:-1].reshape(num_experts_a, num_experts_b)


def vocab_specialization(counts: ArrayLike) -> torch.Tensor:
    """OLMoE vocabulary specialisation from ``counts [..., E]`` (e.g. token id x first-choice expert): the
    share of each row's occurrences that go to its most frequent expert. Rows never seen are NaN."""
    c = _float_on_device(counts)
    total = c.sum(-1)
    return torch.where(total > 0, c.amax(-1) / total.clamp_min(1), torch.full_like(total, math.nan))


def vocab_specialization_random(occurrences: ArrayLike, load: ArrayLike, draws: int = 8, seed: int = 0) -> float:
    """Baseline for the occurrence-weighted ``vocab_specialization``: each token id's ``occurrences`` drawn
    independently of the id from the first-choice distribution ``load`` (Monte Carlo, ``draws`` draws, seeded).

    An id seen once scores 1 by construction and a skewed load raises the figure too; both are in the baseline.
    """
    n = np.asarray(occurrences, dtype=np.int64).reshape(-1)
    p = np.asarray(load, dtype=np.float64).reshape(-1)
    if n.sum() == 0:
        return math.nan
    rng = np.random.default_rng(seed)
    p = p / p.sum()
    best = np.zeros(n.size)
    for _ in range(draws):
        best += rng.multinomial(n, p).max(axis=1)
    return float(best.sum() / (draws * n.sum()))
