"""Streaming per-router statistics, accumulated on each router's own device with no host syncs.

Every batch adds into fixed-size tensors ([C], [E, E], scalars), so memory does not grow with the
corpus. Pad rows are neutralised arithmetically (expert id -1, weight 0) rather than by boolean
indexing, which would synchronise. The host sees the tensors once, in ``finish``.

Batches are atomic: each router call only computes the batch's own sums (tensors it would compute anyway),
and ``end_batch`` adds them into the totals once the whole forward ran. A forward stopped half-way (Ctrl-C
inside a later layer) therefore leaves every router's totals at the finished batches, never a mix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from moe_inspect import metrics
from moe_inspect.model.capture import RouterOutput
from moe_inspect.model.routers import RouterSpec


@dataclass
class RouterTotals:
    """Host copies of one router's sums, ready for the end-of-run metric functions."""

    spec: RouterSpec
    tokens: int
    count: np.ndarray  # [C] assignments per column (routed then null experts)
    first_choice: np.ndarray  # [C]
    prob_sum: np.ndarray  # [C] sum over tokens of the family's routing probability
    weight_sum: np.ndarray  # [C] sum of combine weights of the tokens that chose the column
    coactivation: np.ndarray  # [E, E]
    entropy_sum: float
    top1_sum: float
    z_sum: float
    aux_count: np.ndarray | None  # [C'] HF top-k-of-softmax counts over the recorded logits' columns
    aux_prob_sum: np.ndarray | None
    repeat_first: int
    repeat_any: int
    pairs: int
    dropped: dict[float, int] = field(default_factory=dict)
    # [C] real-token assignments the router itself dropped over capacity; None where it applies none
    capacity_dropped: np.ndarray | None = None


def _has_logits(spec: RouterSpec) -> bool:
    """Routers returning probabilities (Gemma-4) or product keys (Doge) have no logits for z-loss and aux loss."""
    return spec.scoring not in ("probabilities", "product_key")


class _RouterState:
    """Device-side sums for one router, allocated on the first call (on the device its outputs live on)."""

    def __init__(self, spec: RouterSpec, capacity_factors: tuple[float, ...], device: torch.device) -> None:
        c, e = spec.num_columns, spec.num_experts
        self.spec = spec
        self.has_logits = _has_logits(spec)
        z = {"device": device}
        self.count = torch.zeros(c, dtype=torch.int64, **z)
        self.first = torch.zeros(c, dtype=torch.int64, **z)
        self.prob_sum = torch.zeros(c, dtype=torch.float64, **z)
        self.weight_sum = torch.zeros(c, dtype=torch.float64, **z)
        self.coact = torch.zeros(e, e, dtype=torch.int64, **z)
        self.scalars = torch.zeros(3, dtype=torch.float64, **z)  # entropy, top-1 prob, z-loss sums
        self.repeats = torch.zeros(3, dtype=torch.int64, **z)  # same first, any overlap, pairs
        self.dropped = torch.zeros(len(capacity_factors), dtype=torch.int64, **z)
        self.aux_count: torch.Tensor | None = None
        self.aux_prob: torch.Tensor | None = None
        self.capacity_dropped = torch.zeros(c, dtype=torch.int64, **z) if spec.applies_capacity else None
        self.tokens = 0

    def add(self, part: _BatchSums, tokens: int) -> None:
        """Commit one finished batch's sums (same devices and dtypes, so in place and without a sync)."""
        self.tokens += tokens
        self.count += part.count
        self.first += part.first
        self.prob_sum += part.prob_sum
        self.weight_sum += part.weight_sum
        self.coact += part.coact
        self.scalars += part.scalars
        self.repeats += part.repeats
        self.dropped += part.dropped
        if part.aux_count is not None:
            if self.aux_count is None:
                self.aux_count = torch.zeros_like(part.aux_count)
                self.aux_prob = torch.zeros_like(part.aux_count)
            self.aux_count += part.aux_count
            self.aux_prob += part.aux_prob  # type: ignore[operator]
        if self.capacity_dropped is not None and part.capacity_dropped is not None:
            self.capacity_dropped += part.capacity_dropped


@dataclass
class _BatchSums:
    """One router's contribution of one batch, held on its device until the batch's forward finished."""

    count: torch.Tensor
    first: torch.Tensor
    prob_sum: torch.Tensor
    weight_sum: torch.Tensor
    coact: torch.Tensor
    scalars: torch.Tensor
    repeats: torch.Tensor
    dropped: torch.Tensor
    aux_count: torch.Tensor | None
    aux_prob: torch.Tensor | None
    capacity_dropped: torch.Tensor | None = None

    def merged(self, other: _BatchSums) -> _BatchSums:
        """Two calls of one router in the same batch (not seen in practice, but then both count)."""
        both = {}
        for name in self.__dataclass_fields__:
            mine, theirs = getattr(self, name), getattr(other, name)
            both[name] = mine if theirs is None else theirs if mine is None else mine + theirs
        return _BatchSums(**both)


class BalanceAccumulator:
    """Capture sink for ``balance``: ``begin_batch`` before each forward, ``end_batch`` after it, ``finish`` at the
    end. A batch without ``end_batch`` (its forward was interrupted) is left out of every figure."""

    def __init__(self, routers: list[RouterSpec], capacity_factors: tuple[float, ...] = (1.0, 1.25, 2.0)) -> None:
        self.routers = routers
        self.capacity_factors = tuple(capacity_factors)
        self._states: dict[int, _RouterState] = {}
        self._pending: dict[int, _BatchSums] = {}  # this batch's sums per router, until end_batch
        self._masks_cpu: dict[str, torch.Tensor] = {}
        self._masks: dict[tuple[str, torch.device], torch.Tensor] = {}
        self._batch_tokens: dict[str, int] = {}
        self.batches = 0

    def begin_batch(self, attention_mask: torch.Tensor, decoder_mask: torch.Tensor | None = None) -> None:
        """Register the (B, S) mask of the batch about to run; its real-token count is read on the host.

        An encoder-decoder's decoder routers see other rows than its encoder's: ``decoder_mask`` (B, T) is theirs.
        """
        decoder = attention_mask if decoder_mask is None else decoder_mask
        self._masks_cpu = {"encoder": attention_mask, "decoder": decoder}
        self._masks = {}
        self._pending = {}  # an earlier batch left without end_batch is dropped here
        # CPU tensors from the corpus reader: no device sync
        self._batch_tokens = {stack: int(mask.sum()) for stack, mask in self._masks_cpu.items()}

    def end_batch(self) -> None:
        """The forward finished: add its sums into the totals (a few in-place adds per router, no sync)."""
        for index, part in self._pending.items():
            state = self._states.get(index)
            if state is None:
                spec = next(r for r in self.routers if r.index == index)
                state = self._states[index] = _RouterState(spec, self.capacity_factors, part.count.device)
            state.add(part, self._batch_tokens[state.spec.stack])
        self._pending = {}
        self.batches += 1

    def _mask_on(self, stack: str, device: torch.device) -> torch.Tensor:
        mask = self._masks.get((stack, device))
        if mask is None:
            assert self._masks_cpu, "begin_batch() must be called before the forward"
            mask = self._masks_cpu[stack].to(device, non_blocking=True).bool()
            self._masks[(stack, device)] = mask
        return mask

    def __call__(self, spec: RouterSpec, out: RouterOutput) -> None:
        device = out.experts.device
        mask2d = self._mask_on(spec.stack, device)
        batch_tokens = self._batch_tokens[spec.stack]
        batch, seq = mask2d.shape
        mask = mask2d.reshape(-1)
        if out.experts.shape[0] != mask.numel():
            raise RuntimeError(
                f"router {spec.path} saw {out.experts.shape[0]} rows but the batch has {mask.numel()} positions"
            )
        maskf = mask.to(torch.float32)
        c, e, k = spec.num_columns, spec.num_experts, out.experts.shape[1]
        has_logits = _has_logits(spec)
        experts = torch.where(mask.unsqueeze(-1), out.experts, -1)
        weights = out.weights.float() * maskf.unsqueeze(-1)
        weight_sum = torch.zeros(c, dtype=torch.float64, device=device)
        weight_sum.index_add_(0, experts.clamp_min(0).reshape(-1), weights.reshape(-1).double())
        probs = out.probabilities(spec)
        top1, _ = metrics.top1_margin(probs)
        sums = [
            (metrics.router_entropy(probs) * maskf).sum(),
            (top1 * maskf).sum(),
            (metrics.z_loss(out.logits) * maskf).sum() if has_logits else torch.zeros((), device=device),
        ]
        aux_count = aux_prob = None
        if has_logits:
            aux_count, aux_prob, _ = metrics.aux_loss_sums(out.logits, k, mask)
            aux_count, aux_prob = aux_count.double(), aux_prob.double()
        dropped = [
            metrics.dropped_assignments(
                experts, e, cf, capacity=metrics.expert_capacity(batch_tokens, k, e, cf)
            )
            for cf in self.capacity_factors
        ]
        part = _BatchSums(
            count=metrics.expert_counts(experts, c),
            first=metrics.first_choice_counts(experts, c),
            prob_sum=(probs * maskf.unsqueeze(-1)).sum(0).double(),
            weight_sum=weight_sum,
            coact=metrics.coactivation_counts(experts, e),
            scalars=torch.stack(sums).double(),
            repeats=torch.stack(metrics.repeat_counts_batched(experts.view(batch, seq, k), mask2d)),
            dropped=torch.stack(dropped) if dropped else torch.zeros(0, dtype=torch.int64, device=device),
            aux_count=aux_count,
            aux_prob=aux_prob,
            # what the router itself dropped, real tokens only (pads' rows are -1 in ``experts``)
            capacity_dropped=None if out.dropped is None or not spec.applies_capacity
            else metrics.expert_counts(torch.where(out.dropped, experts, -1), c),
        )
        seen = self._pending.get(spec.index)
        self._pending[spec.index] = part if seen is None else seen.merged(part)

    def finish(self) -> list[RouterTotals]:
        """Copy every router's sums to the host (one copy per tensor) for the end-of-run metrics."""
        totals = []
        for spec in self.routers:
            state = self._states.get(spec.index)
            if state is None:
                continue
            scalars = state.scalars.cpu().numpy()
            repeats = state.repeats.cpu().numpy()
            dropped = state.dropped.cpu().numpy()
            totals.append(
                RouterTotals(
                    spec=spec,
                    tokens=state.tokens,
                    count=state.count.cpu().numpy(),
                    first_choice=state.first.cpu().numpy(),
                    prob_sum=state.prob_sum.cpu().numpy(),
                    weight_sum=state.weight_sum.cpu().numpy(),
                    coactivation=state.coact.cpu().numpy(),
                    entropy_sum=float(scalars[0]),
                    top1_sum=float(scalars[1]),
                    z_sum=float(scalars[2]) if state.has_logits else math.nan,
                    aux_count=None if state.aux_count is None else state.aux_count.cpu().numpy(),
                    aux_prob_sum=None if state.aux_prob is None else state.aux_prob.cpu().numpy(),
                    repeat_first=int(repeats[0]),
                    repeat_any=int(repeats[1]),
                    pairs=int(repeats[2]),
                    dropped={cf: int(d) for cf, d in zip(self.capacity_factors, dropped, strict=True)},
                    capacity_dropped=None if state.capacity_dropped is None else state.capacity_dropped.cpu().numpy(),
                )
            )
        return totals


def sum_totals(parts: list[list[RouterTotals]]) -> list[RouterTotals]:
    """Router-wise sums of several corpora's totals (every field is a sum, so this equals one run over all)."""
    by_router: dict[int, RouterTotals] = {}
    for totals in parts:
        for t in totals:
            seen = by_router.get(t.spec.index)
            if seen is None:
                by_router[t.spec.index] = replace(t, dropped=dict(t.dropped))
                continue
            for name in ("tokens", "count", "first_choice", "prob_sum", "weight_sum", "coactivation", "entropy_sum",
                         "top1_sum", "z_sum", "repeat_first", "repeat_any", "pairs"):
                setattr(seen, name, getattr(seen, name) + getattr(t, name))
            for name in ("aux_count", "aux_prob_sum", "capacity_dropped"):
                if getattr(seen, name) is not None and getattr(t, name) is not None:
                    setattr(seen, name, getattr(seen, name) + getattr(t, name))
                elif getattr(t, name) is not None:
                    setattr(seen, name, getattr(t, name))
            seen.dropped = {cf: seen.dropped.get(cf, 0) + d for cf, d in t.dropped.items()}
    return [by_router[index] for index in sorted(by_router)]
