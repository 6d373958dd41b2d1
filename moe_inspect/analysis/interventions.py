"""Routing changes applied through forward hooks on the routers: a different k, removed experts, expert capacity.

A router returns ``(logits, top_k_weights, top_k_index)`` and its MoE block hands the last two to the experts
module. The hook keeps the logits, recomputes the selection with the family's own rule (named in the family
registry, ``FamilyFacts.reselect``) under the change, and returns the new pair, so the block and its experts
run unmodified. No modeling file is touched, hooks are removed on exit (even on errors), and no parameter or
attribute of the model is written: the unchanged model is the same model once the context ends.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from moe_inspect import metrics
from moe_inspect.errors import UserError
from moe_inspect.model.families import facts_for
from moe_inspect.model.routers import RouterSpec

DropPolicy = Literal["position", "probs"]


@dataclass(frozen=True)
class RoutingChange:
    """One setting: a new k (``dense`` = every expert), removed ``(layer, expert)`` pairs, or a capacity factor."""

    label: str
    top_k: int | None = None
    dense: bool = False
    removed: frozenset[tuple[int, int]] = frozenset()
    capacity_factor: float | None = None
    drop_policy: DropPolicy = "position"

    def k_for(self, spec: RouterSpec) -> int:
        """The number of experts this router picks under the change."""
        if self.dense:
            return spec.num_experts
        return self.top_k if self.top_k is not None else spec.top_k

    def touches(self, spec: RouterSpec) -> bool:
        return (
            self.dense
            or (self.top_k is not None and self.top_k != spec.top_k)
            or self.capacity_factor is not None
            or any(layer == spec.layer for layer, _ in self.removed)
        )


# ------------------------------------------------------------------------------------------------ validation


def reroutable_routers(routers: list[RouterSpec], model_type: str) -> list[RouterSpec]:
    """The routers a change may touch; one sentence naming the family when its selection cannot be changed.

    Each router is judged by its own family (a vision-language checkpoint's routers are its text model's, e.g.
    ``aria_text`` inside ``aria``); ``model_type`` names the checkpoint in the sentence.
    """
    families = {spec.model_type for spec in routers} or {model_type}
    if any(facts_for(family).reselect is None for family in families) or any(
        spec.parser != "tuple" or spec.heuristic for spec in routers
    ):
        raise UserError(
            f"moe-inspect cannot change the routing of the {model_type} family: its selection is not "
            "a router output it re-implements (supported: "
            f"{', '.join(supported_families())})."
        )
    return routers


def supported_families() -> list[str]:
    from moe_inspect.model.families import FAMILIES

    return sorted(name for name, facts in FAMILIES.items() if facts.reselect is not None)


def moe_layers(routers: list[RouterSpec]) -> dict[int, RouterSpec]:
    return {spec.layer: spec for spec in routers if spec.kind == "mlp"}


def top_k_change(k: int, routers: list[RouterSpec], label: str | None = None) -> RoutingChange:
    """Every MoE layer picks ``k`` experts; refused unless 1 <= k <= E in every layer."""
    smallest = min(spec.num_experts for spec in routers)
    if not 1 <= k <= smallest:
        raise UserError(f"`top_k` must be between 1 and the number of experts ({smallest}); got {k}.")
    return RoutingChange(label=label or f"top-k={k}", top_k=k)


def dense_change(label: str = "dense") -> RoutingChange:
    return RoutingChange(label=label, dense=True)


def check_request(top_k: Iterable[int], drop_experts: Iterable[str], capacity_factors: Iterable[float]) -> None:
    """What can be refused without the model (before loading it): k < 1, capacity <= 0, malformed items."""
    for k in top_k:
        if k < 1:
            raise UserError(f"`top_k` must be at least 1; got {k}.")
    for factor in capacity_factors:
        if not factor > 0:
            raise UserError(f"A capacity factor must be positive; got {factor}.")
    for spec in drop_experts:
        for item in (part.strip() for part in spec.split(",")):
            if not _ITEM.fullmatch(item):
                raise UserError(f"'{item}' is not LAYER:EXPERT (for example 5:0 or *:3).")


_ITEM = re.compile(r"(\*|\d+)\s*:\s*\d+")


def parse_removed(spec: str, routers: list[RouterSpec], num_layers: int) -> frozenset[tuple[int, int]]:
    """``'*:3'`` or ``'5:0,5:7'`` -> {(layer, expert)}; every item checked against the model before any pass."""
    layers = moe_layers(routers)
    removed: set[tuple[int, int]] = set()
    for item in (part.strip() for part in spec.split(",")):
        layer_text, sep, expert_text = item.partition(":")
        try:
            if not sep:
                raise ValueError
            expert = int(expert_text)
            chosen = sorted(layers) if layer_text.strip() == "*" else [int(layer_text)]
        except ValueError:
            raise UserError(f"'{item}' is not LAYER:EXPERT (for example 5:0 or *:3).") from None
        for layer in chosen:
            if not 0 <= layer < num_layers:
                raise UserError(
                    f"Layer {layer} does not exist: the model has {num_layers} layers (0-{num_layers - 1})."
                )
            if layer not in layers:
                raise UserError(f"Layer {layer} is a dense layer: it has no experts to remove.")
            count = layers[layer].num_experts
            if not 0 <= expert < count:
                raise UserError(f"Expert {expert} does not exist: layer {layer} has {count} experts (0-{count - 1}).")
            removed.add((layer, expert))
    for layer, spec_ in layers.items():
        left = spec_.num_experts - sum(1 for lay, _ in removed if lay == layer)
        if left < spec_.top_k:
            raise UserError(
                f"Layer {layer} would keep {left} experts, fewer than the {spec_.top_k} each token needs."
            )
    return frozenset(removed)


def removal_change(spec: str, routers: list[RouterSpec], num_layers: int, label: str | None = None) -> RoutingChange:
    return RoutingChange(label=label or f"drop-experts={spec}", removed=parse_removed(spec, routers, num_layers))


def capacity_change(factor: float, policy: DropPolicy = "position", label: str | None = None) -> RoutingChange:
    if not factor > 0:
        raise UserError(f"A capacity factor must be positive; got {factor}.")
    if policy not in ("position", "probs"):
        raise UserError(f"The drop policy must be 'position' or 'probs'; got '{policy}'.")
    return RoutingChange(label=label or f"capacity-factor={factor}", capacity_factor=factor, drop_policy=policy)


# ------------------------------------------------------------------------------------------ the family rules


def reselect(
    spec: RouterSpec, module: nn.Module, logits: torch.Tensor, k: int, removed: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights, index) the family's router would return with ``k`` and the ``removed`` (E,) bool experts gone.

    Each branch is the router's own sequence of torch ops, so with the family's k and nothing removed the result
    equals the router's output bit for bit (tests/test_ablate_families.py).
    """
    facts = facts_for(spec.model_type)
    rule = facts.reselect
    if rule == "softmax_topk":
        masked = logits if removed is None else logits.masked_fill(removed, float("-inf"))
        probs = torch.nn.functional.softmax(masked, dtype=torch.float, dim=-1)
        values, index = torch.topk(probs, k, dim=-1)
        norm = facts.weight_norm
        if norm == "always" or (norm == "config" and bool(getattr(module, "norm_topk_prob", False))):
            values /= values.sum(dim=-1, keepdim=True)
        return values, index
    if rule == "topk_softmax":
        masked = logits if removed is None else logits.masked_fill(removed, float("-inf"))
        values, index = torch.topk(masked, k, dim=-1)
        return torch.nn.functional.softmax(values, dim=1, dtype=values.dtype), index
    if rule == "deepseek_v3":
        return _deepseek_v3(module, logits, k, removed)
    raise UserError(f"moe-inspect cannot change the routing of the {spec.model_type} family.")


def _deepseek_v3(
    module: nn.Module, logits: torch.Tensor, k: int, removed: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Bias-corrected, group-limited selection: the bias picks, the unbiased sigmoid weighs."""
    experts = logits.shape[-1]
    groups = int(getattr(module, "num_group", None) or getattr(module, "n_group", None) or 1)
    scores = logits.sigmoid()
    choice = scores + module.e_score_correction_bias
    if removed is not None:
        choice = choice.masked_fill(removed, float("-inf"))
    group_scores = choice.view(-1, groups, experts // groups).topk(2, dim=-1)[0].sum(dim=-1)
    group_idx = torch.topk(group_scores, k=int(module.topk_group), dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores)
    group_mask.scatter_(1, group_idx, 1)
    score_mask = group_mask.unsqueeze(-1).expand(-1, groups, experts // groups).reshape(-1, experts)
    choice = choice.masked_fill(~score_mask.bool(), float("-inf"))
    index = torch.topk(choice, k=k, dim=-1, sorted=False)[1]
    weights = scores.gather(1, index)
    if getattr(module, "norm_topk_prob", False):
        weights /= weights.sum(dim=-1, keepdim=True) + 1e-20
    return weights * module.routed_scaling_factor, index


# ---------------------------------------------------------------------------------------------- the hooks


@dataclass
class Rerouter:
    """Applies one RoutingChange while active; counts capacity drops per router on each router's device.

    A batch's drop counts are held apart until ``end_batch`` (its passes all finished), so Ctrl-C in the middle
    of a batch leaves the counts at the finished batches, like the losses.
    """

    routers: list[RouterSpec]
    change: RoutingChange
    dropped: dict[int, torch.Tensor] = field(default_factory=dict)  # router index -> int64 device scalar
    assignments: dict[int, int] = field(default_factory=dict)  # router index -> real tokens * k (host ints)
    _mask_cpu: torch.Tensor | None = field(default=None, init=False)
    _masks: dict[torch.device, torch.Tensor] = field(default_factory=dict, init=False)
    _tokens: int = field(default=0, init=False)
    _pending: dict[int, tuple[torch.Tensor, int]] = field(default_factory=dict, init=False)  # this batch's

    def begin_batch(self, attention_mask: torch.Tensor) -> None:
        """The batch's (B, S) mask: pads are never counted, never dropped, and do not take capacity."""
        self._mask_cpu = attention_mask
        self._masks = {}
        self._pending = {}  # a batch left without end_batch never counts
        self._tokens = int(attention_mask.sum())

    def end_batch(self) -> None:
        """The batch finished: its drop counts join the totals (out of place, so in or out of inference mode)."""
        for index, (dropped, assigned) in self._pending.items():
            seen = self.dropped.get(index)
            self.dropped[index] = dropped if seen is None else seen + dropped
            self.assignments[index] = self.assignments.get(index, 0) + assigned
        self._pending = {}

    def _mask_on(self, device: torch.device) -> torch.Tensor:
        if device not in self._masks:
            assert self._mask_cpu is not None, "begin_batch() must be called before the forward"
            self._masks[device] = self._mask_cpu.to(device, non_blocking=True).reshape(-1).bool()
        return self._masks[device]

    def _removed_mask(self, spec: RouterSpec, device: torch.device) -> torch.Tensor | None:
        experts = [e for layer, e in self.change.removed if layer == spec.layer]
        if not experts:
            return None
        mask = torch.zeros(spec.num_experts, dtype=torch.bool, device=device)
        mask[experts] = True
        return mask

    def _hook(self, spec: RouterSpec) -> Callable[..., Any]:
        k = self.change.k_for(spec)
        removed_cache: dict[torch.device, torch.Tensor | None] = {}

        def hook(module: nn.Module, _args: Any, out: Any) -> Any:
            logits, old_weights = out[0], out[1]
            if logits.device not in removed_cache:
                removed_cache[logits.device] = self._removed_mask(spec, logits.device)
            removed = removed_cache[logits.device]
            if k == spec.top_k and removed is None:  # selection unchanged (capacity only): the router's own
                weights, index = old_weights, out[2]
            else:
                weights, index = reselect(spec, module, logits, k, removed)
                weights = weights.to(old_weights.dtype)
            if self.change.capacity_factor is not None:
                weights = self._apply_capacity(spec, weights, index)
            return (out[0], weights, index.to(out[2].dtype), *out[3:])

        return hook

    def _apply_capacity(self, spec: RouterSpec, weights: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Zero the weights of assignments over capacity: the expert adds nothing, the token keeps its residual."""
        cf = self.change.capacity_factor
        assert cf is not None
        mask = self._mask_on(index.device)
        k = index.shape[1]
        experts = torch.where(mask.unsqueeze(-1), index, -1)  # as balance counts: pads hold no capacity
        capacity = metrics.expert_capacity(self._tokens, k, spec.num_experts, cf)
        keep = metrics.capacity_keep_mask(
            experts, spec.num_experts, cf, capacity=capacity, policy=self.change.drop_policy, weights=weights
        )
        dropped, assigned = (~keep).sum(), self._tokens * k
        seen = self._pending.get(spec.index)
        self._pending[spec.index] = (dropped, assigned) if seen is None else (seen[0] + dropped, seen[1] + assigned)
        return torch.where(keep, weights, torch.zeros_like(weights))

    @contextmanager
    def active(self) -> Iterator[Rerouter]:
        """Hooks on the routers the change touches for the duration of the block, removed even on errors."""
        handles = []
        try:
            for spec in self.routers:
                if self.change.touches(spec):
                    handles.append(spec.module.register_forward_hook(self._hook(spec)))
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def drop_counts(self) -> dict[int, tuple[int, int]]:
        """router index -> (dropped, assignments), one host copy per router."""
        return {i: (int(self.dropped[i]), self.assignments[i]) for i in self.dropped}
