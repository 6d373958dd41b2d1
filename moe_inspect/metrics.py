"""Every routing-metric formula moe-inspect reports, as pure functions.

Definitions follow ``shared/reference/routing-metrics.md``. Notation: ``E`` routed experts in a layer, ``k``
experts per token, ``T`` real (non-pad) tokens, ``n[e]`` assignments of expert ``e`` (``sum(n) == T*k``).

Two kinds of function live here:

* **End-of-run** functions take per-layer accumulated counts/sums (``[E]`` tensors, numpy arrays or lists) and
  return Python floats/ints. They copy the ``[E]`` vector to the host once and work in float64, so they are
  exact enough for corpus-sized counts and run on any device (MPS has no float64).
* **Per-batch** functions (``routing_distribution``, ``router_entropy``, ``top1_margin``, ``z_loss``,
  ``aux_loss_sums``, ``expert_counts``, ``first_choice_counts``, ``dropped_assignments``,
  ``capacity_keep_mask``, ``repeat_counts``, ``repeat_counts_batched``, ``coactivation_counts``,
  ``transition_counts``) are vectorised torch, stay on the input's device and never synchronise with the host
  (no ``.item()``, ``bincount``, boolean indexing or host-to-device copies), so they can run inside the
  capture loop as long as every input (masks included) is already on the device. Their results are meant to
  be summed across batches.

Expert ids outside ``[0, E)`` (or ``[0, num_columns)``) are ignored by the counting functions: these are the
null/zero experts some families append after the routed ones, and ``-1`` padding.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Literal

import numpy as np
import torch

__all__ = [
    "assignment_share",
    "aux_loss_from_sums",
    "aux_loss_sums",
    "balancedness",
    "capacity_keep_mask",
    "coactivation_counts",
    "coactivation_share",
    "coefficient_of_variation",
    "dead_experts",
    "deepseek_balance_loss",
    "dropped_assignments",
    "effective_experts",
    "expert_capacity",
    "expert_counts",
    "first_choice_counts",
    "hf_aux_loss",
    "jain_index",
    "js_divergence",
    "kth_margin",
    "load_entropy",
    "load_js",
    "log2_ratio",
    "max_over_mean",
    "max_violation",
    "random_repeat_baselines",
    "repeat_counts",
    "repeat_counts_batched",
    "router_entropy",
    "routing_distribution",
    "set_intersection",
    "specialisation",
    "switch_loss",
    "token_share",
    "top1_margin",
    "topk_kl",
    "total_variation",
    "transition_counts",
    "utilization_ratio",
    "vocab_specialization",
    "vocab_specialization_random",
    "weight_overlap",
    "z_loss",
]

ArrayLike = torch.Tensor | np.ndarray | list[float] | list[int]
Number = int | float | torch.Tensor
# How a family scores experts; the one definition (families.py and routers.py import it). "product_key" (Doge)
# scores half-keys, not experts, so ``routing_distribution`` does not take it (capture has its own rule).
Scoring = Literal["softmax", "sigmoid", "sqrtsoftplus", "probabilities", "product_key"]
SCORINGS: tuple[str, ...] = ("softmax", "sigmoid", "sqrtsoftplus", "probabilities")

_TINY32 = torch.finfo(torch.float32).tiny


# ----------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------


def _host64(x: ArrayLike) -> torch.Tensor:
    """A 1-D float64 CPU copy (one small device-to-host copy; end-of-run functions only)."""
    if isinstance(x, np.ndarray):  # pandas hands out read-only views; torch warns on those
        return torch.from_numpy(np.array(x, dtype=np.float64).reshape(-1))
    return torch.as_tensor(x).detach().to(device="cpu", dtype=torch.float64).reshape(-1)


def _scalar(x: Number) -> float:
    return float(x.item()) if isinstance(x, torch.Tensor) else float(x)


def _float_on_device(x: ArrayLike) -> torch.Tensor:
    """float64 where the device supports it (not MPS), on the input's device."""
    t = torch.from_numpy(np.array(x)) if isinstance(x, np.ndarray) else torch.as_tensor(x).detach()
    return t.to(torch.float32 if t.device.type == "mps" else torch.float64)


def _counts_into(ids: torch.Tensor, num_bins: int) -> torch.Tensor:
    """Histogram of ``ids`` into ``num_bins`` int64 bins, ignoring ids outside ``[0, num_bins)``.

    ``torch.bincount`` reads the maximum back to the host to size its output; ``scatter_add_`` into a fixed
    buffer with an overflow bin does not (the same trick vLLM/SGLang use for their expert histograms).
    """
    flat = ids.reshape(-1).long()
    valid = (flat >= 0) & (flat < num_bins)
    key = torch.where(valid, flat, num_bins)
    out = torch.zeros(num_bins + 1, dtype=torch.int64, device=ids.device)
    out.scatter_add_(0, key, torch.ones_like(key))
    return out[:num_bins]


def _check_experts_2d(experts: torch.Tensor, name: str = "experts") -> torch.Tensor:
    if experts.dim() == 1:
        experts = experts.unsqueeze(-1)
    if experts.dim() != 2:
        raise ValueError(f"{name} must have shape [T, k], got {tuple(experts.shape)}")
    return experts


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


# ----------------------------------------------------------------------------------------------------------
# router confidence (per batch, on device)
# ----------------------------------------------------------------------------------------------------------


def routing_distribution(logits: torch.Tensor, scoring: Scoring) -> torch.Tensor:
    """The family's own routing distribution over the last dim, always in float32.

    * ``softmax``: ``softmax(logits)`` (Mixtral, Qwen-MoE, OLMoE, ...).
    * ``sigmoid``: ``s / sum(s)`` with ``s = sigmoid(logits)`` -- DeepSeek-V3's normalised ``s'`` used in its
      balance loss (the sigmoid scores themselves do not sum to 1).
    * ``sqrtsoftplus``: ``sqrt(softplus(x))`` normalised the same way (DeepSeek-V4's router score).
    * ``probabilities``: the router already returns probabilities (Gemma-4); returned as they are.

    A row whose scores all underflow to 0 stays 0 instead of becoming NaN.
    """
    x = logits.float()
    if scoring == "softmax":
        return torch.softmax(x, dim=-1)
    if scoring == "probabilities":
        return x
    if scoring == "sigmoid":
        s = torch.sigmoid(x)
    elif scoring == "sqrtsoftplus":
        s = torch.nn.functional.softplus(x).sqrt()
    else:
        raise ValueError(f"unknown scoring {scoring!r}; expected one of {SCORINGS}")
    return s / s.sum(dim=-1, keepdim=True).clamp_min(_TINY32)


def router_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Per-token router entropy ``-sum_c p log p / log C`` over the last dim (``C = probs.shape[-1]``), float32.

    ``0 log 0 = 0`` (``torch.special.entr``). 0 = fully confident, 1 = uniform. With ``C == 1`` the choice
    carries no uncertainty, so the result is 0. Report the mean over tokens (accumulate the sum).
    """
    p = probs.float()
    h = torch.special.entr(p).sum(dim=-1)
    c = p.shape[-1]
    return h / math.log(c) if c > 1 else torch.zeros_like(h)


def top1_margin(probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token top-1 probability and the margin between ranks 0 and 1 (margin = top-1 when ``C == 1``)."""
    p = probs.float()
    top = torch.topk(p, min(2, p.shape[-1]), dim=-1).values
    margin = top[..., 0] - top[..., 1] if top.shape[-1] > 1 else top[..., 0]
    return top[..., 0], margin


# ----------------------------------------------------------------------------------------------------------
# auxiliary losses
# ----------------------------------------------------------------------------------------------------------


def aux_loss_sums(
    logits: torch.Tensor, top_k: int, attention_mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-batch sums for the HF aux loss, computed exactly as transformers' ``load_balancing_loss_func``.

    Returns ``(topk_count_sum [E], prob_sum [E], tokens)`` as float32 device tensors (no host sync), to be
    added up across batches and fed to ``aux_loss_from_sums``. As in transformers: softmax in the logits'
    own dtype, ``topk`` on those probabilities, probabilities summed in float32; the attention mask
    (``[B, S]``, rows of ``logits`` are ``B*S`` batch-major) weights every row, and ``tokens = mask.sum()``.
    """
    num_experts = logits.shape[-1]
    logits = logits.reshape(-1, num_experts)
    routing_weights = torch.softmax(logits, dim=-1)
    selected = torch.topk(routing_weights, top_k, dim=-1).indices
    probs = routing_weights.float()
    if attention_mask is None:
        weight = torch.ones(logits.shape[0], dtype=torch.float32, device=logits.device)
    else:
        weight = attention_mask.reshape(-1).to(device=logits.device, dtype=torch.float32)
        if weight.numel() != logits.shape[0]:
            raise ValueError(f"attention_mask has {weight.numel()} entries but logits have {logits.shape[0]} rows")
    counts = torch.zeros(num_experts, dtype=torch.float32, device=logits.device)
    counts.scatter_add_(0, selected.reshape(-1), weight.unsqueeze(-1).expand(-1, top_k).reshape(-1))
    prob_sum = (probs * weight.unsqueeze(-1)).sum(dim=0)
    return counts, prob_sum, weight.sum()


def aux_loss_from_sums(topk_onehot_sum: ArrayLike, prob_sum: ArrayLike, tokens: Number, num_experts: int) -> float:
    """HF aux loss ``E * sum_e (c_e / T) * (P_sum_e / T)`` from streamed sums (float64 on the host).

    ``topk_onehot_sum`` is the sum over tokens of ``one_hot(selected)``: either ``[k, E]`` (one row per rank,
    the layout of transformers <= 4.x, which averaged a ``[T, k, E]`` one-hot over tokens to ``[k, E]``, then
    summed ``tokens_per_expert * P[None]``) or ``[E]`` already summed over ranks (the layout of transformers
    5.x, which histograms all ``T*k`` selections into ``[E]``). Both give the same number because the final
    sum runs over ranks too; rank rows are summed here. ``prob_sum`` is the sum of softmax probabilities,
    ``tokens`` the (mask-weighted) token count. Uniform probabilities with balanced selection give ``k``.

    For several layers transformers concatenates them: its loss is this function applied to the sums over
    layers with ``tokens = L*T`` -- not the mean of per-layer losses.
    """
    c = torch.as_tensor(topk_onehot_sum).detach().to(device="cpu", dtype=torch.float64)
    if c.shape[-1] != num_experts:
        raise ValueError(f"topk_onehot_sum last dim {c.shape[-1]} != num_experts {num_experts}")
    c = c.reshape(-1, num_experts).sum(0)
    p = _host64(prob_sum)
    if p.numel() != num_experts:
        raise ValueError(f"prob_sum has {p.numel()} entries, expected {num_experts}")
    t = _scalar(tokens)
    if t <= 0:
        return math.nan
    return float(num_experts * ((c / t) * (p / t)).sum())


def hf_aux_loss(logits: torch.Tensor, top_k: int, attention_mask: torch.Tensor | None = None) -> float:
    """transformers' Mixtral-family ``load_balancing_loss_func((logits,), E, top_k, attention_mask)`` for one
    layer (``logits [T, E]``, ``mask [B, S]`` with ``B*S == T`` rows batch-major). Uniform routing gives k."""
    c, p, t = aux_loss_sums(logits, top_k, attention_mask)
    return aux_loss_from_sums(c, p, t, logits.shape[-1])


def switch_loss(first_choice_counts: ArrayLike, prob_sum: ArrayLike, tokens: Number) -> float:
    """Switch Transformer load-balancing loss without alpha (Fedus et al. 2021, eq. 4): ``E * sum f_e P_e``,
    ``f_e`` = fraction of tokens whose rank-0 expert is ``e``, ``P_e`` = mean softmax probability. Uniform = 1.
    """
    f, p = _host64(first_choice_counts), _host64(prob_sum)
    t = _scalar(tokens)
    if t <= 0:
        return math.nan
    return float(f.numel() * ((f / t) * (p / t)).sum())


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    """Per-token ``logsumexp(logits)^2`` in float32. Its mean over tokens is the ST-MoE router z-loss (Zoph et
    al. 2022, eq. 5, without its coefficient); a streamed run accumulates the sum and divides by T."""
    return torch.logsumexp(logits.float(), dim=-1).square()


def deepseek_balance_loss(n: ArrayLike, prob_sum: ArrayLike, tokens: Number, k: int, alpha: float = 1.0) -> float:
    """DeepSeek balance loss ``alpha * sum_i f_i P_i`` with ``f_i = E/(k*T) * n_i`` and ``P_i`` = mean of the
    normalised scores ``s'`` (``routing_distribution(.., "sigmoid")`` for V3). Uniform routing gives alpha.

    DeepSeek-V3 computes it per sequence (sequence-wise loss; average per-sequence values for that); over a
    whole corpus it is DeepSeek-V2's expert-level balance loss.
    """
    c, p = _host64(n), _host64(prob_sum)
    t = _scalar(tokens)
    if t <= 0:
        return math.nan
    e = c.numel()
    return float(alpha * ((e / (k * t)) * c * (p / t)).sum())


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


def topk_kl(
    logp_a: torch.Tensor, rest_a: torch.Tensor, logp_b: torch.Tensor, rest_b: torch.Tensor
) -> torch.Tensor:
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
