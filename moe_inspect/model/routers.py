"""Find every MoE router in a loaded model, matched by class, never by attribute name.

transformers implements ``output_router_logits`` by hooking the classes each model declares in
``_can_record_outputs["router_logits"]``. Reading that declaration is the robust way to find routers:
names are unreliable (``gate`` also matches ``gate_proj`` and Qwen's ``shared_expert_gate``). Remote-code
models that declare nothing fall back to a shape heuristic, flagged as such.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from moe_inspect.errors import NotMoEError
from moe_inspect.io.schemas import router_label
from moe_inspect.metrics import Scoring
from moe_inspect.model.families import (
    ROUTER_PARSERS,
    Parser,
    facts_for,
    null_expert_count,
    scoring_for,
)

EXPERT_COUNT_ATTRS = (
    "num_experts",
    "n_routed_experts",
    "num_local_experts",
    "moe_num_experts",
    "num_routed_experts",
)
TOP_K_ATTRS = ("top_k", "num_experts_per_tok", "moe_topk", "moe_k", "top_k_experts", "num_experts_per_token")
SHARED_ATTRS = ("shared_experts", "shared_expert", "shared_mlp")
SHARED_COUNT_KEYS = (
    "n_shared_experts",
    "num_shared_experts",
    "moe_num_shared_experts",
    "shared_expert_count",
)
_ATTENTION_RE = re.compile(r"(?:^|\.)(?:self_)?attention(?:\.|$)")
_ENCODER_RE = re.compile(r"(?:^|\.)encoder(?:\.|$)")
_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|blocks|block|h|layer)\.(\d+)(?:\.|$)")


@dataclass
class RouterSpec:
    """One hooked router: where it sits and how its output is read."""

    index: int
    layer: int
    path: str
    kind: str  # "mlp", or "attention" for JetMoE's mixture-of-attention router
    model_type: str
    router_class: str
    num_experts: int  # routed experts E, without zero/skip columns
    top_k: int
    null_experts: int  # zero (LongCat) or skip (Zaya) expert columns after the routed ones
    null_label: str
    scoring: Scoring
    parser: Parser
    logits_index: int
    selection: str  # "top-k", "bias-corrected", "hash", "product-key"
    shared_experts: int
    heuristic: bool = False
    stack: str = "decoder"  # "encoder" for the encoder of an encoder-decoder (Switch, NLLB-MoE)
    module: nn.Module = field(default=None, repr=False, compare=False)  # type: ignore[assignment]
    selection_module: nn.Module | None = field(default=None, repr=False, compare=False)

    @property
    def num_columns(self) -> int:
        """Width of the routing distribution: routed plus null experts (product keys span E)."""
        return self.num_experts + self.null_experts

    @property
    def applies_capacity(self) -> bool:
        """Whether the router itself drops assignments over expert capacity (its output says which: Switch, NLLB)."""
        return self.parser in ("switch", "nllb")

    @property
    def label(self) -> str:
        """Short column label: the layer index, suffixed for JetMoE's attention routers."""
        return router_label(self.layer, self.kind)

    def describe(self) -> dict[str, Any]:
        """Plain-data view for tables, JSON and the Python API."""
        return {
            "router": self.index,
            "layer": self.layer,
            "kind": self.kind,
            "path": self.path,
            "router_class": self.router_class,
            "experts": self.num_experts,
            "top_k": self.top_k,
            "null_experts": self.null_experts,
            "shared_experts": self.shared_experts,
            "scoring": self.scoring,
            "selection": self.selection,
            "heuristic": self.heuristic,
            "stack": self.stack,
        }


@dataclass(frozen=True)
class _Target:
    classes: tuple[type, ...]
    class_names: tuple[str, ...]
    index: int
    layer_name: str | None
    model_type: str
    config: Any


def _recorder_specs(pretrained: nn.Module) -> list[Any]:
    spec = (getattr(type(pretrained), "_can_record_outputs", None) or {}).get("router_logits")
    if spec is None:
        return []
    return spec if isinstance(spec, list) else [spec]


def _targets_for(pretrained: nn.Module) -> list[_Target]:
    """Translate one PreTrainedModel's recorder declaration into match targets."""
    config = getattr(pretrained, "config", None)
    model_type = getattr(config, "model_type", "") or ""
    facts = facts_for(model_type)
    targets: list[_Target] = []
    for spec in _recorder_specs(pretrained):
        if isinstance(spec, type):
            cls, name, index, layer_name = spec, None, 1, None
        elif isinstance(spec, str):
            cls, name, index, layer_name = None, spec, 1, None
        else:
            cls, name = spec.target_class, spec.class_name
            index, layer_name = spec.index if spec.index is not None else 0, spec.layer_name
        if cls is not None and cls.__name__ in facts.skip_router_classes:
            continue
        targets.append(
            _Target(
                classes=(cls,) if cls is not None else (),
                class_names=(name,) if name else (),
                index=index,
                layer_name=layer_name,
                model_type=model_type,
                config=config,
            )
        )
    if targets and facts.text_router:  # the recorded block mixes modalities: hook its text router instead
        router_class, text_part = facts.text_router
        targets = [_Target((), (router_class,), 0, text_part, model_type, config)]
    if targets and facts.extra_router_classes:
        targets.append(
            _Target((), facts.extra_router_classes, 0, None, model_type, config)
        )
    return targets


def _walk(module: nn.Module, prefix: str, targets: list[_Target]) -> Iterator[tuple[str, nn.Module, _Target]]:
    """Yield (path, module, target) like transformers' hook installer: submodels bring their own targets."""
    for name, child in module.named_children():
        path = f"{prefix}.{name}" if prefix else name
        child_targets = targets
        if child is not module and _is_pretrained(child) and _recorder_specs(child):
            child_targets = _targets_for(child)
        for target in child_targets:
            if _matches(child, path, target):
                yield path, child, target
                break
        yield from _walk(child, path, child_targets)


def _is_pretrained(module: nn.Module) -> bool:
    from transformers import PreTrainedModel

    return isinstance(module, PreTrainedModel)


def _matches(module: nn.Module, path: str, target: _Target) -> bool:
    by_class = bool(target.classes) and isinstance(module, target.classes)
    hit = by_class or type(module).__name__ in target.class_names
    if not hit:
        return False
    return target.layer_name is None or f".{target.layer_name.strip('.')}." in f".{path}."


def stack_of(path: str) -> str:
    """'encoder' for routers inside an encoder-decoder's encoder, else 'decoder' (every decoder-only model)."""
    return "encoder" if _ENCODER_RE.search(path) else "decoder"


def layer_index(path: str) -> int:
    """Decoder-layer index from a module path (``model.layers.12.mlp.gate`` -> 12)."""
    match = _LAYER_RE.search(path)
    if match:
        return int(match.group(1))
    numbers = re.findall(r"(?:^|\.)(\d+)(?:\.|$)", path)
    return int(numbers[0]) if numbers else -1


def safe_getattr(obj: Any, name: str) -> Any:
    """getattr that survives per-layer configs, whose global attributes raise a RuntimeError subclass."""
    try:
        return getattr(obj, name, None)
    except Exception:
        return None


def int_attr(obj: Any, names: tuple[str, ...], layer: int = -1) -> int | None:
    """The first positive int among ``names`` on ``obj``; per-layer lists are indexed by ``layer``."""
    for name in names:
        value = safe_getattr(obj, name)
        if isinstance(value, (list, tuple)) and value and 0 <= layer < len(value):
            value = value[layer]
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def parent_module(model: nn.Module, path: str) -> nn.Module | None:
    """The module that owns ``path`` (None for a top-level name)."""
    return model.get_submodule(path.rsplit(".", 1)[0]) if "." in path else None


def moe_block(model: nn.Module, spec: RouterSpec) -> nn.Module | None:
    """The module holding this router's experts: its parent, or the router itself when the recorded module
    is the whole MoE block (Doge)."""
    if facts_for(spec.model_type).router_linears is not None:
        return spec.module
    return parent_module(model, spec.path)


def has_shared(block: nn.Module | None) -> bool:
    return block is not None and any(getattr(block, a, None) is not None for a in SHARED_ATTRS)


def _shared_experts(parent: nn.Module | None, config: Any) -> int:
    if not has_shared(parent):
        return 0
    count = int_attr(config, SHARED_COUNT_KEYS, -1)
    return count or 1


def _build_spec(model: nn.Module, index: int, path: str, module: nn.Module, target: _Target) -> RouterSpec:
    layer = layer_index(path)
    parent = parent_module(model, path)
    config = target.config
    facts = facts_for(target.model_type)
    class_name = type(module).__name__
    parser: Parser = ROUTER_PARSERS.get(class_name, "tuple")
    experts = (
        int_attr(module, EXPERT_COUNT_ATTRS, layer)
        or int_attr(parent, EXPERT_COUNT_ATTRS, layer)
        or int_attr(config, EXPERT_COUNT_ATTRS, layer)
        or int_attr(getattr(config, "ffn_config", None), EXPERT_COUNT_ATTRS, layer)  # DBRX
        or 0
    )
    top_k = facts.fixed_top_k or (
        int_attr(module, TOP_K_ATTRS, layer)
        or int_attr(parent, TOP_K_ATTRS, layer)
        or int_attr(config, TOP_K_ATTRS, layer)
        or int_attr(getattr(config, "ffn_config", None), ("moe_top_k",), layer)  # DBRX
        or 0
    )
    scoring = scoring_for(target.model_type, config)
    if class_name in facts.extra_router_classes:
        selection = "hash"
    elif scoring == "product_key":
        selection = "product-key"
    elif facts.bias_corrected:
        selection = "bias-corrected"
    else:
        selection = "top-k"
    if target.model_type == "dbrx":  # DBRX keeps k and the experts on the parent FFN.
        selection_module = getattr(parent, "experts", None)
        top_k = int_attr(parent, ("top_k",), layer) or top_k
    else:
        selection_module = None
    return RouterSpec(
        index=index,
        layer=layer,
        path=path,
        kind="attention" if _ATTENTION_RE.search(path) else "mlp",
        model_type=target.model_type,
        router_class=class_name,
        num_experts=experts,
        top_k=top_k,
        null_experts=null_expert_count(target.model_type, config),
        null_label=facts.null_expert_label,
        scoring=scoring,
        parser=parser,
        logits_index=target.index,
        selection=selection,
        shared_experts=_shared_experts(parent if parser != "doge" else module, config),
        module=module,
        selection_module=selection_module,
        stack=stack_of(path),
    )


def find_routers(model: nn.Module) -> list[RouterSpec]:
    """Every router in ``model`` in execution order; raises NotMoEError when there is none.

    Works on meta-device models too (nothing here runs a forward), so ``info`` can use it.
    """
    top_targets = _targets_for(model) if _recorder_specs(model) else []
    found: list[tuple[str, nn.Module, _Target]] = []
    seen: set[int] = set()
    for path, module, target in _walk(model, "", top_targets):
        if id(module) not in seen:
            seen.add(id(module))
            found.append((path, module, target))
    if not found:
        config = getattr(model, "config", None)
        model_type = getattr(config, "model_type", "unknown")
        searched = sorted({type(m).__name__ for m in model.modules() if _is_pretrained(m)})
        raise NotMoEError(
            f"Model type '{model_type}' has no MoE router: moe-inspect searched the router classes declared "
            f"for output_router_logits by {', '.join(searched) or 'its model classes'} and found none."
        )
    return [_build_spec(model, i, path, module, target) for i, (path, module, target) in enumerate(found)]


def router_linear_names(model: nn.Module, routers: list[RouterSpec]) -> list[str]:
    """Full names of plain ``nn.Linear`` modules that compute router scores.

    bitsandbytes replaces exactly-typed ``nn.Linear``; these must stay in full precision (LongCat crashes
    otherwise, and a quantized router changes the routes being inspected).
    """
    names: list[str] = []
    for spec in routers:
        facts = facts_for(spec.model_type)
        candidates: list[tuple[str, nn.Module]]
        if facts.router_linears is not None:
            candidates = [(n, spec.module.get_submodule(n)) for n in facts.router_linears]
        else:
            candidates = list(spec.module.named_modules())
        for sub, mod in candidates:
            if type(mod) is nn.Linear:
                names.append(f"{spec.path}.{sub}" if sub else spec.path)
    return names
