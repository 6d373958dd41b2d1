"""Hook every router for the duration of forward passes and read what it decided.

The experts and weights come from the router's own output, never from a generic softmax/top-k over
the logits: for bias-corrected, group-limited, hash and skip-expert families that would pick the wrong
experts. Hooks stay on the device (no ``.item()``, no ``.cpu()``), so capture adds no host syncs; the
consumer (a recorder for ``route`` or an accumulator for ``balance``) decides when to copy.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from moe_inspect.metrics import routing_distribution
from moe_inspect.model.routers import RouterSpec


@dataclass
class RouterOutput:
    """What one router call decided, for ``T = batch * seq`` rows in batch-major order (pads included)."""

    logits: torch.Tensor  # what output_router_logits records, float32: (T, C), Doge (2, T, sqrt E)
    experts: torch.Tensor  # (T, k) int64; ids >= E are null experts (LongCat zero, Zaya skip)
    weights: torch.Tensor  # (T, k) float32 combine weights as the experts received them
    hash_selected: bool = False
    # (T, k) True where the router chose the expert but dropped the assignment (over capacity: Switch, NLLB-MoE)
    dropped: torch.Tensor | None = None

    def probabilities(self, spec: RouterSpec) -> torch.Tensor:
        """The family's own routing distribution (T, C), float32."""
        if spec.scoring == "product_key":
            return product_key_distribution(self.logits)
        return routing_distribution(self.logits, spec.scoring)


def product_key_distribution(logits: torch.Tensor) -> torch.Tensor:
    """Doge: softmax over all sqrt(E) x sqrt(E) key-pair scores, the space its top-k ranks."""
    scores = logits[0].unsqueeze(-1) + logits[1].unsqueeze(-2)
    return torch.softmax(scores.reshape(scores.shape[0], -1).float(), dim=-1)


Sink = Callable[[RouterSpec, RouterOutput], None]


def _jetmoe(out: tuple[Any, ...], spec: RouterSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Undo JetMoE's expert-sorted layout back to per-token (T, k) rows, rank order kept."""
    index_sorted, _batch_index, batch_gates, expert_size, logits = out
    tokens, k = logits.shape[0], spec.top_k
    sizes = torch.as_tensor(expert_size, device=logits.device)
    sorted_experts = torch.repeat_interleave(torch.arange(sizes.numel(), device=logits.device), sizes)
    experts = torch.empty(tokens * k, dtype=torch.long, device=logits.device)
    weights = torch.empty(tokens * k, dtype=torch.float32, device=logits.device)
    experts[index_sorted] = sorted_experts
    weights[index_sorted] = batch_gates.float()
    return experts.view(tokens, k), weights.view(tokens, k)


def _doge(logits: torch.Tensor, module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Doge's product-key rule, the same ops as DogeCDMoE.forward (its indices are not returned)."""
    keys, k = module.num_keys, module.top_k
    (scores_x, scores_y), (idx_x, idx_y) = logits.topk(keys, dim=-1)
    all_scores = (scores_x.unsqueeze(-1) + scores_y.unsqueeze(-2)).flatten(-2)
    all_indices = (idx_x.unsqueeze(-1) * keys + idx_y.unsqueeze(-2)).flatten(-2)
    scores, position = all_scores.topk(k, dim=-1)
    weights = torch.softmax(scores, dim=-1)
    return all_indices.gather(-1, position), weights.float()


def _switch(out: tuple[Any, ...]) -> RouterOutput:
    """Switch's (dispatch mask after capacity (B, S, E), max probability (B, S, 1), logits (B, S, E)).

    A kept token's expert is its mask's one; a dropped token's is the argmax the router took (of its logits).
    """
    mask, probs, logits = out
    num_experts = logits.shape[-1]
    mask = mask.reshape(-1, num_experts)
    logits = logits.reshape(-1, num_experts).float()
    kept = mask.sum(-1) > 0
    experts = torch.where(kept, mask.argmax(-1), logits.argmax(-1)).unsqueeze(-1)
    return RouterOutput(logits, experts, probs.reshape(-1, 1).float(), dropped=~kept.unsqueeze(-1))


def _nllb(out: tuple[Any, ...]) -> RouterOutput:
    """NLLB-MoE's (top-1 mask after capacity (T, E), combine weights (T, E), logits (T, E)).

    The second expert is the best logit besides the first, as the router picks it (after its Gumbel noise under
    the 'sampling' policy, which it adds to the returned logits in place); the combine weights of both are what
    the experts receive, zero where the assignment was dropped.
    """
    top1_mask, gates, logits = out
    logits = logits.float()
    kept1 = top1_mask.sum(-1) > 0
    first = torch.where(kept1, top1_mask.argmax(-1), logits.argmax(-1))
    others = logits.scatter(-1, first.unsqueeze(-1), float("-inf"))
    experts = torch.stack([first, others.argmax(-1)], dim=-1)
    weights = gates.float().gather(-1, experts)
    dropped = torch.stack([~kept1, weights[:, 1] == 0], dim=-1)
    return RouterOutput(logits, experts, weights, dropped=dropped)


def parse_output(spec: RouterSpec, out: Any) -> RouterOutput | None:
    """Turn a router's forward output into a RouterOutput; None when selection arrives later (DBRX).

    Rank order is the order the router returned, i.e. what the experts module receives.
    """
    parser = spec.parser
    if parser == "tuple":
        experts = out[2]
        return RouterOutput(
            logits=out[spec.logits_index].float(),
            experts=experts.long(),
            weights=out[1].float(),
            hash_selected=spec.selection == "hash",
        )
    if parser == "logits_only":
        return None
    if parser == "llama4":
        scores, logits = out[0], out[1]
        experts = torch.topk(logits, spec.top_k, dim=-1).indices
        return RouterOutput(logits=logits.float(), experts=experts, weights=scores.gather(1, experts).float())
    if parser == "jetmoe":
        experts, weights = _jetmoe(out, spec)
        return RouterOutput(logits=out[4].float(), experts=experts, weights=weights)
    if parser == "doge":
        logits = out[spec.logits_index]
        experts, weights = _doge(logits, spec.module)
        return RouterOutput(logits=logits.float(), experts=experts, weights=weights)
    if parser == "zaya":
        weights = out[1].float()
        # The router rewrites a chosen skip expert to id 0 with weight 0; softmax weights are never 0.
        experts = torch.where(weights == 0, spec.num_experts, out[2].long())
        return RouterOutput(logits=out[0].float(), experts=experts, weights=weights)
    if parser == "switch":
        return _switch(out)
    if parser == "nllb":
        return _nllb(out)
    raise ValueError(f"unknown router parser {parser!r}")


class RouterCapture:
    """Forward hooks on every router, removed on exit even when the forward raises.

    Each router call becomes a RouterOutput passed to ``sink``; with ``keep=True`` they are also
    stored in ``calls[router_index]`` (one entry per call, so generation gives prefill + one per step).
    """

    def __init__(self, routers: list[RouterSpec], sink: Sink | None = None, keep: bool = True) -> None:
        self.routers = routers
        self.sink = sink
        self.keep = keep
        self.calls: list[list[RouterOutput]] = [[] for _ in routers]
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._pending: dict[int, torch.Tensor] = {}

    def _emit(self, spec: RouterSpec, result: RouterOutput) -> None:
        if self.keep:
            self.calls[spec.index].append(result)
        if self.sink is not None:
            self.sink(spec, result)

    def _router_hook(self, spec: RouterSpec) -> Callable[..., None]:
        def hook(_module: nn.Module, _args: Any, out: Any) -> None:
            result = parse_output(spec, out)
            if result is None:
                self._pending[spec.index] = out.detach().float()
            else:
                self._emit(spec, result)

        return hook

    def _selection_hook(self, spec: RouterSpec) -> Callable[..., None]:
        def pre_hook(_module: nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
            top_k_index = kwargs.get("top_k_index", args[1] if len(args) > 1 else None)
            top_k_weights = kwargs.get("top_k_weights", args[2] if len(args) > 2 else None)
            logits = self._pending.pop(spec.index)
            self._emit(spec, RouterOutput(logits, top_k_index.long(), top_k_weights.float()))

        return pre_hook

    def __enter__(self) -> RouterCapture:
        try:
            for spec in self.routers:
                self._handles.append(spec.module.register_forward_hook(self._router_hook(spec)))
                if spec.selection_module is not None:
                    self._handles.append(
                        spec.selection_module.register_forward_pre_hook(
                            self._selection_hook(spec), with_kwargs=True
                        )
                    )
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def remove(self) -> None:
        """Remove every hook this capture installed."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._pending.clear()


@contextmanager
def capture(
    routers: list[RouterSpec], sink: Sink | None = None, keep: bool = True
) -> Iterator[RouterCapture]:
    """``with capture(routers) as cap: model(**batch)`` -> ``cap.calls``; hooks gone afterwards."""
    with RouterCapture(routers, sink=sink, keep=keep) as cap:
        yield cap
