"""Router confidence (per batch, on device) and the auxiliary load-balancing losses families train with."""

from __future__ import annotations

import math

import torch

from moe_inspect.metrics._common import _TINY32, SCORINGS, ArrayLike, Number, Scoring, _host64, _scalar

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
