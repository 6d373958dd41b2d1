"""Load and balance: end-of-run, per-layer formulas over accumulated expert counts."""

from __future__ import annotations

import math

import numpy as np
import torch

from moe_inspect.metrics._common import ArrayLike, Number, _float_on_device, _host64, _scalar

# ----------------------------------------------------------------------------------------------------------
# load and balance (end of run, per layer, from counts)
# ----------------------------------------------------------------------------------------------------------


def assignment_share(n: ArrayLike) -> torch.Tensor:
    """``n / sum(n)``: each expert's share of the layer's ``T*k`` assignments (uniform = 1/E).

    All-zero counts give NaN (no tokens: the share is undefined, not zero).
    """
    t = _float_on_device(n)
    return t / t.sum()


def token_share(n: ArrayLike, tokens: Number) -> torch.Tensor:
    """``n / T``: the fraction of tokens that use each expert (OLMoE's measure; uniform = k/E, sums to k)."""
    t = _float_on_device(n)
    return t / (tokens.to(t) if isinstance(tokens, torch.Tensor) else float(tokens))


def _entropy_nats(share: ArrayLike) -> tuple[float, int]:
    s = _host64(share)
    if bool((s < 0).any()):
        raise ValueError("shares/counts must be non-negative")
    total = float(s.sum())
    if s.numel() == 0 or total <= 0.0:
        return math.nan, int(s.numel())
    return float(torch.special.entr(s / total).sum()), int(s.numel())


def load_entropy(share: ArrayLike) -> float:
    """Normalised load entropy ``-sum s log s / log E`` (1 = perfectly uniform, 0 = one expert takes all).

    ``share`` is renormalised to sum 1 first, so assignment shares, token shares or raw counts all give the
    same value; ``0 log 0 = 0``. Choices: ``E == 1`` returns 1.0 (a single expert is trivially balanced,
    matching ``coefficient_of_variation == 0`` and ``jain_index == 1``); an all-zero vector returns NaN.
    """
    h, e = _entropy_nats(share)
    if math.isnan(h):
        return math.nan
    return 1.0 if e == 1 else h / math.log(e)


def effective_experts(share: ArrayLike) -> float:
    """``exp(H)`` with ``H`` the natural-log load entropy: the number of equally used experts that would
    give the same entropy (uniform = E, one expert = 1). Renormalises like ``load_entropy``; all-zero -> NaN.
    """
    h, _ = _entropy_nats(share)
    return math.exp(h) if not math.isnan(h) else math.nan


def coefficient_of_variation(n: ArrayLike) -> float:
    """``std(n) / mean(n)`` with the *population* std (ddof=0): the counts are the whole layer, not a sample
    of experts. Uniform = 0; all-zero counts -> NaN."""
    t = _host64(n)
    mean = float(t.mean())
    return float(t.std(correction=0)) / mean if mean > 0 else math.nan


def max_over_mean(n: ArrayLike) -> float:
    """``max(n) / mean(n)`` (uniform = 1). ``MaxVio`` of loss-free balancing (Wang et al. 2024) is this
    minus 1; TensorRT-LLM's "imbalance ratio" is the same quantity per rank. All-zero -> NaN."""
    t = _host64(n)
    mean = float(t.mean())
    return float(t.max()) / mean if mean > 0 else math.nan


def max_violation(n: ArrayLike) -> float:
    """``MaxVio = max(n)/mean(n) - 1`` (Wang et al. 2024, "Auxiliary-loss-free load balancing")."""
    return max_over_mean(n) - 1.0


def jain_index(n: ArrayLike) -> float:
    """Jain's fairness index ``(sum n)^2 / (E * sum n^2)``, in ``[1/E, 1]`` (1 = uniform). All-zero -> NaN."""
    t = _host64(n)
    sq = float((t * t).sum())
    return float(t.sum()) ** 2 / (t.numel() * sq) if sq > 0 else math.nan


def dead_experts(n: ArrayLike) -> int:
    """Number of experts with zero assignments over the measured corpus."""
    return int((_host64(n) == 0).sum())


def utilization_ratio(n: ArrayLike, tokens: Number, k: int) -> torch.Tensor:
    """NeMo's utilisation ratio ``n[e] / (T*k/E)`` (uniform = 1 for every expert)."""
    t = _float_on_device(n)
    return t * t.numel() / (_scalar(tokens) * k)


def balancedness(n: ArrayLike, num_ranks: int | None = None, placement: ArrayLike | None = None) -> float:
    """SGLang / vLLM-EPLB balancedness ``mean(load) / max(load)`` over expert-parallel ranks.

    Experts are placed contiguously (rank ``r`` holds experts ``r*E/R .. (r+1)*E/R - 1``, the default
    placement without EPLB); ``num_ranks=None`` means one expert per rank, i.e. ``1 / max_over_mean(n)``.
    ``placement`` (a physical-to-logical map ``[P]``, slots contiguous per rank, as EPLB's ``phy2log``) places
    replicas instead: each replica takes an equal share of its expert's load. Equals ``1 / (1 + MaxVio)`` at
    rank level. All-zero -> NaN.
    """
    t = _host64(n)
    if placement is not None:
        slots = torch.as_tensor(np.asarray(placement), dtype=torch.int64)
        replicas = torch.bincount(slots, minlength=t.numel()).to(t.dtype)
        t = t[slots] / replicas[slots]
    ranks = t.numel() if num_ranks is None else num_ranks
    if ranks <= 0 or t.numel() % ranks:
        raise ValueError(f"{t.numel()} experts cannot be split evenly over {ranks} ranks")
    load = t.reshape(ranks, -1).sum(1)
    mx = float(load.max())
    return float(load.mean()) / mx if mx > 0 else math.nan


def total_variation(share_a: ArrayLike, share_b: ArrayLike) -> float:
    """Total-variation distance ``0.5 * sum |a - b|`` between two layers' share vectors (each renormalised to
    sum 1), in ``[0, 1]``: the domain-comparison measure."""
    a, b = _host64(share_a), _host64(share_b)
    if a.shape != b.shape:
        raise ValueError(f"share vectors differ in length: {a.numel()} vs {b.numel()}")
    return 0.5 * float((a / a.sum() - b / b.sum()).abs().sum())
