"""Routers of remote-code models transformers does not know, found by shape rather than by declared class.

Kept apart from ``routers`` because every router found here is a guess (Mixtral-style softmax top-k is
assumed) and is flagged ``heuristic`` so the tables and ``info`` can say so.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from moe_inspect.errors import NotMoEError
from moe_inspect.model.routers import (
    EXPERT_COUNT_ATTRS,
    SHARED_COUNT_KEYS,
    TOP_K_ATTRS,
    RouterSpec,
    has_shared,
    int_attr,
    layer_index,
)
from moe_inspect.model.source import text_config


def find_routers_heuristic(model: nn.Module, sample: torch.Tensor) -> list[RouterSpec]:
    """Fallback for remote-code models: modules whose output's last dim equals the configured E.

    Runs one forward on ``sample`` with temporary hooks on every module and keeps the outermost matches.
    """
    config = getattr(model, "config", None)
    experts = int_attr(config, EXPERT_COUNT_ATTRS, -1)
    top_k = int_attr(config, TOP_K_ATTRS, -1) or 1
    model_type = getattr(config, "model_type", "unknown")
    if not experts:
        raise NotMoEError(
            f"Model type '{model_type}' is not known to transformers and its config names no expert count "
            f"({', '.join(EXPERT_COUNT_ATTRS)}), so moe-inspect cannot find its routers."
        )
    hits: dict[str, tuple[nn.Module, int]] = {}
    handles = []

    def make_hook(path: str, mod: nn.Module) -> Any:
        def hook(_m: nn.Module, _args: Any, out: Any) -> None:
            items = out if isinstance(out, (tuple, list)) else (out,)
            for i, item in enumerate(items):
                if isinstance(item, torch.Tensor) and item.is_floating_point() and item.shape[-1] == experts:
                    hits.setdefault(path, (mod, i))
                    return

        return hook

    try:
        for path, mod in model.named_modules():
            if path and not isinstance(mod, (nn.ModuleList, nn.Embedding)) and "lm_head" not in path:
                handles.append(mod.register_forward_hook(make_hook(path, mod)))
        with torch.no_grad():
            model(input_ids=sample)
    finally:
        for h in handles:
            h.remove()
    outermost = [p for p in hits if not any(p != q and p.startswith(q + ".") for q in hits)]
    if not outermost:
        raise NotMoEError(
            f"Model type '{model_type}' is not known to transformers and no module produced {experts} "
            "expert scores, so moe-inspect found no router."
        )
    warnings.warn(
        f"Model type '{model_type}' is unknown to transformers: routers were matched heuristically "
        f"(modules whose output has {experts} columns). Check them with `moe-inspect route`.",
        stacklevel=2,
    )
    return [
        heuristic_spec(i, path, hits[path][0], model_type, experts, top_k, logits_index=hits[path][1])
        for i, path in enumerate(outermost)
    ]


def heuristic_spec(
    index: int,
    path: str,
    module: nn.Module,
    model_type: str,
    num_experts: int,
    top_k: int,
    logits_index: int = 0,
    shared_experts: int = 0,
) -> RouterSpec:
    """A router found without a class declaration: Mixtral-style softmax top-k assumed, flagged ``heuristic``."""
    return RouterSpec(
        index=index, layer=layer_index(path), path=path, kind="mlp", model_type=model_type,
        router_class=type(module).__name__, num_experts=num_experts, top_k=min(top_k, num_experts), null_experts=0,
        null_label="null", scoring="softmax", parser="tuple" if logits_index == 0 else "logits_only",
        logits_index=logits_index, selection="top-k", shared_experts=shared_experts, heuristic=True, module=module,
    )


def find_routers_structural(model: nn.Module, config: Any) -> list[RouterSpec]:
    """Remote-code fallback on a meta model: blocks with an ``experts`` child and a gate/router beside it.

    A forward pass is impossible on meta tensors, so this reads structure (names) instead of the output
    shape that ``find_routers_heuristic`` uses on loaded models. Flagged ``heuristic``.
    """
    text = text_config(config)
    model_type = getattr(config, "model_type", "unknown")
    top_k = int_attr(text, TOP_K_ATTRS) or 1
    specs: list[RouterSpec] = []
    for path, module in model.named_modules():
        experts = getattr(module, "experts", None)
        gate_name = next((n for n in ("gate", "router") if isinstance(getattr(module, n, None), nn.Module)), None)
        if not isinstance(experts, nn.Module) or gate_name is None:
            continue
        count = len(experts) if isinstance(experts, nn.ModuleList) else int_attr(text, EXPERT_COUNT_ATTRS)
        if not count:
            continue
        shared = (int_attr(text, SHARED_COUNT_KEYS) or 1) if has_shared(module) else 0
        gate_path = f"{path}.{gate_name}" if path else gate_name
        specs.append(
            heuristic_spec(len(specs), gate_path, getattr(module, gate_name), model_type, count, top_k,
                           shared_experts=shared)
        )
    return specs
