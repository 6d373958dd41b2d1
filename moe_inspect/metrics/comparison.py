"""Comparing two routings of the same tokens (per batch, on device) and two load vectors (end of run)."""

from __future__ import annotations

import math

import numpy as np
import torch

from moe_inspect.metrics._common import _TINY32, ArrayLike, _check_experts_2d, _host64

# ----------------------------------------------------------------------------------------------------------
# comparing two routings of the same tokens (per batch, on device) and two load vectors (end of run)
# ----------------------------------------------------------------------------------------------------------


def js_divergence(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Per-row Jensen-Shannon divergence in bits over the last dim, in ``[0, 1]``; float32 (float64 for float64).

    Rows are renormalised to sum 1 first (a half-precision record does not sum exactly to 1), and identical
    rows give exactly 0: both KL terms are then ``x log(x / x)``.
    """
    dtype = torch.float64 if torch.float64 in (p.dtype, q.dtype) else torch.float32
    a, b = p.to(dtype), q.to(dtype)
    a = a / a.sum(-1, keepdim=True).clamp_min(_TINY32)
    b = b / b.sum(-1, keepdim=True).clamp_min(_TINY32)
    m = 0.5 * (a + b)
    kl_a = (torch.xlogy(a, a) - torch.xlogy(a, m)).sum(-1)
    kl_b = (torch.xlogy(b, b) - torch.xlogy(b, m)).sum(-1)
    return (0.5 * (kl_a + kl_b) / math.log(2)).clamp_min(0.0)


def load_js(share_a: ArrayLike, share_b: ArrayLike) -> float:
    """Jensen-Shannon divergence in bits between two load (share) vectors, each renormalised to sum 1."""
    a, b = _host64(share_a), _host64(share_b)
    if a.shape != b.shape:
        raise ValueError(f"share vectors differ in length: {a.numel()} vs {b.numel()}")
    return float(js_divergence(a.double().unsqueeze(0), b.double().unsqueeze(0))[0])


def set_intersection(experts_a: torch.Tensor, experts_b: torch.Tensor) -> torch.Tensor:
    """Per-token ``|S_A ∩ S_B|`` of two ``[T, k]`` top-k sets (ids within one row are distinct), int64."""
    a, b = _check_experts_2d(experts_a), _check_experts_2d(experts_b, "experts_b")
    return (a.unsqueeze(-1) == b.unsqueeze(-2)).any(-1).sum(-1)


def weight_overlap(
    experts_a: torch.Tensor, weights_a: torch.Tensor, experts_b: torch.Tensor, weights_b: torch.Tensor
) -> torch.Tensor:
    """Per-token ``sum_e min(w_A[e], w_B[e])`` with each token's combine weights normalised to sum 1.

    1 = the two models mix the same experts in the same proportions; 0 = disjoint sets. Pairs of equal ids are
    matched directly, so no dense ``[T, E]`` tensor is built.
    """
    wa = weights_a.float() / weights_a.float().sum(-1, keepdim=True).clamp_min(_TINY32)
    wb = weights_b.float() / weights_b.float().sum(-1, keepdim=True).clamp_min(_TINY32)
    same = experts_a.unsqueeze(-1) == experts_b.unsqueeze(-2)
    return (same * torch.minimum(wa.unsqueeze(-1), wb.unsqueeze(-2))).sum((-1, -2))


def kth_margin(probs: torch.Tensor, k: int) -> torch.Tensor:
    """Per-token gap between the k-th and (k+1)-th highest routing probabilities (the k-th itself when C == k):
    how close the last chosen expert was to being swapped out."""
    p = probs.float()
    top = torch.topk(p, min(k + 1, p.shape[-1]), dim=-1).values
    return top[..., k - 1] - top[..., k] if top.shape[-1] > k else top[..., k - 1]


def log2_ratio(share_a: ArrayLike, share_b: ArrayLike) -> np.ndarray:
    """``log2(share_b / share_a)`` per expert: +1 = B uses the expert twice as much. ±inf where one share is 0,
    NaN where both are."""
    a, b = _host64(share_a).numpy(), _host64(share_b).numpy()
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.log2(b) - np.log2(a)


def topk_kl(logp_a: torch.Tensor, rest_a: torch.Tensor, logp_b: torch.Tensor, rest_b: torch.Tensor) -> torch.Tensor:
    """Per-position KL(A || B) in nats over A's top-k tokens plus one bucket holding the rest of the vocabulary.

    ``logp_a``/``logp_b`` (N, k) are both models' log-probabilities of A's top-k ids, ``rest_*`` (N,) the log of
    each model's remaining mass. Merging tokens into one bucket can only lower KL (data processing), so this is
    a lower bound on the full-vocabulary KL that is tight when A's top-k holds nearly all its mass.
    """
    la, lb = logp_a.double(), logp_b.double()
    ra, rb = rest_a.double(), rest_b.double()
    top = (la.exp() * (la - lb)).sum(-1)
    rest = torch.where(ra.isneginf(), torch.zeros_like(ra), ra.exp() * (ra - rb))
    return (top + rest).clamp_min(0.0)


def specialisation(token_share: ArrayLike, num_experts: int, k: int) -> np.ndarray:
    """OLMoE's domain specialisation: an expert's token share over the uniform ``k/E`` (1 = uniform)."""
    return _host64(token_share).numpy() / (k / num_experts)
