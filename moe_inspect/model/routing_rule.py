"""The routing rule in words (``moe-inspect info``), from the family registry and the router modules' own settings."""

from __future__ import annotations

from typing import Any

from torch import nn

from moe_inspect.model.families import facts_for
from moe_inspect.model.routers import RouterSpec, parent_module, safe_getattr
from moe_inspect.model.source import text_config

_GROUP_ATTRS = ("num_group", "n_group", "num_expert_group")
_SCALE_ATTRS = (
    "routed_scaling_factor",
    "route_scale",
    "router_scaling_factor",
    "moe_router_scaling_factor",
    "moe_routed_scaling_factor",
)

_SCORING_WORDS = {
    "softmax": "softmax scores",
    "sigmoid": "sigmoid scores",
    "sqrtsoftplus": "sqrt-softplus scores",
    "probabilities": "softmax probabilities (computed inside the router)",
    "product_key": "product-key scores (two half-keys per expert)",
}


def _first_number(objs: tuple[Any, ...], names: tuple[str, ...]) -> float | None:
    for obj in objs:
        for name in names:
            value = safe_getattr(obj, name)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
    return None


def _router_attr(model: nn.Module, spec: RouterSpec, names: tuple[str, ...]) -> Any:
    """An attribute the router or its MoE block actually holds: what the model uses, not what the config says."""
    for obj in (spec.module, parent_module(model, spec.path)):
        for name in names:
            value = safe_getattr(obj, name)
            if value is not None:
                return value
    return None


def routing_rule(model: nn.Module, config: Any, routers: list[RouterSpec]) -> str:
    """The routing rule in words, from the family registry and the router modules' own settings."""
    if not routers:
        return "Dense: no router, every parameter is used for every token."
    spec = next((r for r in routers if r.kind == "mlp"), routers[0])
    model_type = spec.model_type
    facts = facts_for(model_type)
    text = text_config(config)
    experts = sorted({r.num_experts for r in routers})
    ks = sorted({r.top_k for r in routers})
    e_words = "/".join(map(str, experts))
    k_words = "/".join(map(str, ks))
    if facts.weight_norm == "softmax_over_chosen":
        parts = [f"router logits over {e_words} routed experts"]
    else:
        parts = [f"{_SCORING_WORDS.get(spec.scoring, spec.scoring)} over {e_words} routed experts"]

    if spec.selection == "product-key":
        parts.append(f"top-{k_words} experts found through the best half-keys")
    elif spec.selection == "hash":
        parts.append(f"top-{k_words}; hash layers pick experts by token id instead")
    elif spec.selection == "bias-corrected":
        parts.append(
            f"top-{k_words} chosen on score + a learned per-expert bias (bias-corrected, aux-loss-free balancing); "
            "the weights use the unbiased scores"
        )
    else:
        parts.append(f"top-{k_words} chosen")
    if any(r.selection == "hash" for r in routers) and spec.selection != "hash":
        parts.append("hash layers pick experts by token id")

    groups = _router_attr(model, spec, _GROUP_ATTRS)
    topk_group = _router_attr(model, spec, ("topk_group",))
    method = _router_attr(model, spec, ("topk_method",))
    if (
        isinstance(groups, int) and isinstance(topk_group, int) and 1 <= topk_group < groups
        and method not in ("greedy",)
    ):
        parts.append(
            f"group-limited: only the best {topk_group} of {groups} expert groups are eligible "
            f"(n_group={groups}, topk_group={topk_group})"
        )

    norm = _router_attr(model, spec, ("norm_topk_prob",))
    if facts.weight_norm == "never":
        parts.append("weights are not renormalised")
    elif facts.weight_norm == "softmax_over_chosen":
        parts.append("weights are a softmax over the chosen experts' logits")
    elif model_type == "dbrx":
        p = safe_getattr(safe_getattr(text, "ffn_config"), "moe_normalize_expert_weights")
        if isinstance(p, (int, float)):
            parts.append(f"weights divided by their {p:g}-norm")
    elif isinstance(norm, bool):
        parts.append("weights renormalised to sum to 1" if norm else "weights are not renormalised")
    elif facts.weight_norm == "always":
        parts.append("weights renormalised to sum to 1")

    scale = _router_attr(model, spec, _SCALE_ATTRS)
    if not isinstance(scale, (int, float)) or isinstance(scale, bool):
        scale = _first_number((text,), _SCALE_ATTRS)
    if isinstance(scale, (int, float)) and scale != 1:
        parts.append(f"routed output scaled by {scale:g} (scaling factor)")

    shared = sorted({r.shared_experts for r in routers})
    if shared != [0]:
        count = "/".join(map(str, shared))
        parts.append(f"plus {count} shared expert{'s' if shared != [1] else ''} on every token")
    nulls = max(r.null_experts for r in routers)
    if nulls:
        parts.append(f"{nulls} {spec.null_label} expert column{'s' if nulls > 1 else ''} after the routed ones")
    if any(r.kind == "attention" for r in routers):
        parts.append("a second router per layer chooses attention experts (mixture of attention)")
    if facts.capacity_limited:
        parts.append("assignments beyond an expert's capacity are dropped inside the router (the token skips it)")
    elif facts.fixed_top_k:
        parts.append(f"{model_type} always picks {facts.fixed_top_k} experts whatever the config says")
    sentence = "; ".join(parts) + "."
    # Notes that only repeat what the sentence already says (probabilities, MoA, fixed k) are left out.
    repeated = spec.scoring in ("probabilities", "product_key") or any(r.kind == "attention" for r in routers)
    if facts.note and not repeated and not facts.fixed_top_k:
        sentence += f" Note: {facts.note}."
    return sentence[0].upper() + sentence[1:]
