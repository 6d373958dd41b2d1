"""The library side of ``moe-inspect info``: model size from the config alone, and the routing rule in words.

Total, routed-expert and active parameters and weight memory are counted on a model built from the config
(``source.load_config``) with its routers found by ``routers``.

The model is built on the meta device with ``torch.device("meta")``. accelerate's default
``init_empty_weights()`` is not enough in transformers 5: fused experts call ``torch.empty(E, 2I, H)``
before accelerate moves anything, which is a 30 GB CPU allocation for DeepSeek-V3.

Counting rules (why each one, since publishers count differently):

* total = sum of ``numel`` over ``model.parameters()``: buffers (RoPE tables, DeepSeek's
  ``e_score_correction_bias``) are not weights, and tied embeddings are counted once.
* routed-expert parameters of a router = the parameters of the ``experts`` module of the router's MoE
  block (the router's parent; for Doge, whose recorded module is the whole block, the block itself). When
  the block has no ``experts`` attribute (JetMoE), they are the block's parameters whose first dimension is
  E, leaving out the router and the shared experts.
* active per token = total - sum over routers of routed * (1 - k/E): every parameter is used for every
  token except the E - k experts a token was not routed to.
* "active excluding the input embedding" subtracts the embedding matrix, because an embedding lookup reads
  one row per token; with tied embeddings the same matrix is the LM head, so nothing is subtracted.
* "active non-embedding" subtracts the input embedding and the LM head, tied or not (counted once when
  tied): Kaplan et al.'s N, the convention of publishers such as IBM (Granite 3.0 3B-A800M is "800M active").
* Encoder-decoder models (Switch Transformers, NLLB-MoE): the same rules over both stacks, so "active" is what
  one source token and one target token use together (each stack's own figures are in ``stacks``); layers are
  listed per stack, and the capacity each router applies is stated in the notes.
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch
from torch import nn

from moe_inspect.analysis.model_info import LayerInfo, ModelInfo, RouterInfo, StackInfo
from moe_inspect.errors import NotMoEError, UserError
from moe_inspect.model.families import CheckpointPart, capacity_notes, checkpoint_part, facts_for
from moe_inspect.model.footprint import predicted_footprints
from moe_inspect.model.heuristic_routers import find_routers_structural
from moe_inspect.model.routers import (
    EXPERT_COUNT_ATTRS,
    SHARED_ATTRS,
    RouterSpec,
    find_routers,
    int_attr,
    moe_block,
)
from moe_inspect.model.routing_rule import routing_rule as routing_rule
from moe_inspect.model.source import first_line, load_config, text_config

# Bytes per parameter for weight-memory estimates (weights only: no scales, KV cache or activations).
BYTES_PER_PARAM: dict[str, float] = {"fp32": 4, "bf16": 2, "fp8": 1, "int8": 1, "int4": 0.5}

_LAYER_STACK_RE = re.compile(r"^(.*?(?:^|\.)(?:layers|blocks|block|h|layer))\.\d+(?:\.|$)")
_MTP_ATTRS = ("num_nextn_predict_layers", "mtp_num_layers", "num_mtp_layers")


def build_meta_model(config: Any, trust_remote_code: bool = False) -> nn.Module:
    """The model with every tensor on the meta device: shapes without memory, in a fraction of a second.

    Causal-LM class first (it has the LM head publishers count); configs whose type maps only to a
    conditional-generation class (Gemma-4, Step-3.7) fall back to image-text-to-text, then the bare model.
    """
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText

    model_type = getattr(config, "model_type", "unknown")
    if getattr(config, "is_encoder_decoder", False):  # seq2seq: the class that loads it (NLLB-MoE has no auto class)
        from moe_inspect.model.source import skeleton_model

        with torch.device("meta"):
            return skeleton_model(config, trust_remote_code)
    last: Exception = ValueError("no model class")
    for auto in (AutoModelForCausalLM, AutoModelForImageTextToText, AutoModel):
        try:
            with torch.device("meta"):
                return auto.from_config(config, trust_remote_code=trust_remote_code)
        except ValueError as exc:
            last = exc
            if "Unrecognized configuration class" not in str(exc):
                break
        except Exception as exc:  # a config transformers cannot build is the user's to fix
            last = exc
            break
    raise UserError(f"transformers could not build a '{model_type}' model from this config: {first_line(last)}.")


# -------------------------------------------------------------------------------------------- counting


def _fill_expert_count(model: nn.Module, spec: RouterSpec) -> None:
    """E when the router spec could not read it (DBRX keeps it in ``ffn_config``; probing needs a forward)."""
    if spec.num_experts > 0:
        return
    block = moe_block(model, spec)
    experts = getattr(block, "experts", None) if block is not None else None
    count = int_attr(experts, EXPERT_COUNT_ATTRS) if isinstance(experts, nn.Module) else None
    if count is None:
        linears = [m for m in spec.module.modules() if isinstance(m, nn.Linear)]
        count = linears[0].out_features if len(linears) == 1 else None
    spec.num_experts = count or 0


def _routed_params(model: nn.Module, spec: RouterSpec) -> list[nn.Parameter]:
    """Parameters of the experts this router chooses among (rule in the module docstring)."""
    block = moe_block(model, spec)
    if block is None:
        return []
    experts = getattr(block, "experts", None)
    if isinstance(experts, nn.Module) and experts is not spec.module:
        return list(experts.parameters())
    excluded = {id(p) for p in spec.module.parameters()} if spec.module is not block else set()
    facts = facts_for(spec.model_type)
    for name in facts.router_linears or ():
        excluded |= {id(p) for p in block.get_submodule(name).parameters()}
    for name in SHARED_ATTRS:
        shared = getattr(block, name, None)
        if isinstance(shared, nn.Module):
            excluded |= {id(p) for p in shared.parameters()}
    experts_count = spec.num_experts
    return [
        p for p in block.parameters() if id(p) not in excluded and p.dim() >= 2 and p.shape[0] == experts_count
    ]


def _num_layers(model: nn.Module, config: Any, routers: list[RouterSpec]) -> int:
    """Length of the decoder stack the routers sit in; the config's count when there is no router."""
    if routers and routers[0].stack == "encoder":
        return _num_layers(model, config, [r for r in routers if r.stack == "decoder"])
    if routers:
        match = _LAYER_STACK_RE.match(routers[0].path)
        if match:
            stack = model.get_submodule(match.group(1))
            if isinstance(stack, nn.ModuleList):
                return len(stack)
    configured = int_attr(text_config(config), ("num_hidden_layers", "n_layer", "num_layers", "n_layers"))
    if configured:
        return configured
    return max((r.layer for r in routers), default=-1) + 1


def _embeddings(model: nn.Module) -> tuple[int, int, bool]:
    """(input-embedding params, LM-head params, tied)."""
    try:
        embed = model.get_input_embeddings()
    except (NotImplementedError, AttributeError):
        embed = None
    try:
        head = model.get_output_embeddings()
    except (NotImplementedError, AttributeError):
        head = None
    embed_params = {id(p): p.numel() for p in embed.parameters()} if isinstance(embed, nn.Module) else {}
    head_params = {id(p): p.numel() for p in head.parameters()} if isinstance(head, nn.Module) else {}
    tied = bool(embed_params) and bool(set(embed_params) & set(head_params))
    return sum(embed_params.values()), sum(head_params.values()), tied


def _uniform(values: list[int]) -> int | list[int]:
    if not values:
        return 0
    return values[0] if len(set(values)) == 1 else values


def describe(config_or_model: Any, trust_remote_code: bool = False) -> ModelInfo:
    """All figures of ``moe-inspect info`` for a config (built on meta), a built model, or a model id/path."""
    if isinstance(config_or_model, str):
        config_or_model = load_config(config_or_model, trust_remote_code=trust_remote_code)
    if isinstance(config_or_model, nn.Module):
        model = config_or_model
        config = getattr(model, "config", None)
    else:
        config = config_or_model
    model_type = str(getattr(config, "model_type", "unknown"))
    part = checkpoint_part(config)
    if part is not None and not isinstance(config_or_model, nn.Module):
        return _describe_part(config, part, trust_remote_code)
    if not isinstance(config_or_model, nn.Module):
        model = build_meta_model(config, trust_remote_code=trust_remote_code)
    notes: list[str] = []
    try:
        routers = find_routers(model)
    except NotMoEError:
        from transformers import CONFIG_MAPPING

        routers = find_routers_structural(model, config) if model_type not in CONFIG_MAPPING else []
        if routers:
            notes.append(
                f"'{model_type}' is remote code: its routers were matched by structure (a block with "
                "'experts' beside a 'gate' or 'router'), so check the figures."
            )

    total = sum(p.numel() for p in model.parameters())
    counted: set[int] = set()
    router_infos: list[RouterInfo] = []
    routed_total = 0
    inactive = 0.0
    for spec in routers:
        _fill_expert_count(model, spec)
        params = [p for p in _routed_params(model, spec) if id(p) not in counted]
        counted |= {id(p) for p in params}
        routed = sum(p.numel() for p in params)
        routed_total += routed
        if spec.num_experts > 0:
            inactive += routed * (1 - min(spec.top_k, spec.num_experts) / spec.num_experts)
        router_infos.append(
            RouterInfo(
                spec.layer, spec.kind, spec.path, spec.num_experts, spec.top_k, spec.shared_experts, routed, spec.stack
            )
        )
    if routers and routed_total == 0:
        notes.append("No routed-expert parameters were found beside the routers, so active equals total.")
    active = round(total - inactive)
    embed_params, head_params, tied = _embeddings(model)
    active_excl = active if tied else active - embed_params
    active_non_embedding = active - embed_params - (0 if tied else head_params)
    if tied:
        notes.append(
            "Input embedding and LM head are tied (one matrix), so excluding the input embedding changes nothing."
        )

    num_layers = _num_layers(model, config, routers)
    moe_layers, layers = _layer_table([i for i in router_infos if i.stack == "decoder"], num_layers, "decoder")
    dense_layers = [entry.layer for entry in layers if entry.kind == "dense"]
    moe_entries = [entry for entry in layers if entry.kind == "moe"]
    stacks: list[StackInfo] = []
    if getattr(config, "is_encoder_decoder", False):
        stacks = _stacks(model, routers, router_infos)
        encoder = next(s for s in stacks if s.stack == "encoder")
        _, encoder_layers = _layer_table(
            [i for i in router_infos if i.stack == "encoder"], encoder.num_layers, "encoder"
        )
        layers = encoder_layers + layers
        notes.append(
            "Active counts both stacks: what one source token (encoder) and one target token (decoder) use together."
        )
        notes += capacity_notes(config)

    towers = _towers(model)
    if towers:
        held = " and ".join(f"{path} has {count:,}" for path, count in towers.items())
        notes.append(
            f"{held} parameters, counted in the total and in active; a text-only token does not use them, so text "
            f"tokens use {active - sum(towers.values()):,}."
        )
    mtp = int_attr(text_config(config), _MTP_ATTRS)
    if mtp:
        notes.append(
            f"The config declares {mtp} multi-token-prediction (MTP) layer{'s' if mtp > 1 else ''} that "
            f"transformers does not build, so {'they are' if mtp > 1 else 'it is'} not counted."
        )
    if any(r.null_experts for r in routers):
        notes.append("Zero/skip experts can take some of the k slots, so active is an upper bound.")

    memory = {
        dtype: {"all": math.ceil(total * size), "active": math.ceil(active * size)}
        for dtype, size in BYTES_PER_PARAM.items()
    }
    first = next((r for r in routers if r.kind == "mlp"), routers[0] if routers else None)
    return ModelInfo(
        model_type=model_type,
        model_class=type(model).__name__,
        num_layers=num_layers,
        moe_layers=moe_layers,
        dense_layers=dense_layers,
        num_experts=_uniform([e.experts for e in moe_entries]),
        top_k=_uniform([e.top_k for e in moe_entries]),
        shared_experts=_uniform([e.shared_experts for e in moe_entries]),
        scoring=first.scoring if first else None,
        selection=first.selection if first else None,
        routing_rule=routing_rule(model, config, routers),
        total_params=total,
        routed_expert_params=routed_total,
        active_params=active,
        active_params_excl_input_embedding=active_excl,
        active_params_non_embedding=active_non_embedding,
        input_embedding_params=embed_params,
        lm_head_params=head_params,
        tied_embeddings=tied,
        activation_ratio=active / total if total else 0.0,
        memory=memory,
        layers=layers,
        routers=router_infos,
        heuristic=any(r.heuristic for r in routers),
        notes=notes,
        load_footprint=predicted_footprints(model, routers),
        stacks=stacks,
    )


def _describe_part(config: Any, part: CheckpointPart, trust_remote_code: bool) -> ModelInfo:
    """The part of a multi-model checkpoint that moe-inspect routes (Qwen3-Omni's thinker), the rest counted apart."""
    from moe_inspect.model.source import skeleton_model

    info = describe(getattr(config, part.config_key), trust_remote_code)
    with torch.device("meta"):
        whole = skeleton_model(config, trust_remote_code)
    others = []
    for name, child in whole.named_children():
        if name == part.attr:
            continue
        try:
            routers = len(find_routers(child))
        except NotMoEError:
            routers = 0
        moe = f", MoE with {routers} routers" if routers else ""
        others.append(f"{name} ({sum(p.numel() for p in child.parameters()):,} parameters{moe})")
    info.notes.append(
        f"These figures are the checkpoint's {part.attr}; it also holds {' and '.join(others)}, not counted here: "
        f"{part.others}."
    )
    return info


def _towers(model: nn.Module) -> dict[str, int]:
    """Vision and audio towers of a multimodal model (``model.visual``, ``model.audio_tower``) -> parameters."""
    found: dict[str, int] = {}
    for owner, prefix in ((model, ""), (getattr(model, "model", None), "model.")):
        if not isinstance(owner, nn.Module):
            continue
        for name, child in owner.named_children():
            if any(word in name for word in ("visual", "vision", "audio")):
                found[prefix + name] = sum(p.numel() for p in child.parameters())
    return found


def _layer_table(infos: list[RouterInfo], num_layers: int, stack: str) -> tuple[list[int], list[LayerInfo]]:
    """(MoE layer indices, one LayerInfo per block) of one stack."""
    by_layer: dict[int, list[RouterInfo]] = {}
    for info in infos:
        by_layer.setdefault(info.layer, []).append(info)
    layers: list[LayerInfo] = []
    for layer in range(num_layers):
        found = by_layer.get(layer)
        if not found:
            layers.append(LayerInfo(layer, "dense", 0, 0, 0, 0, stack))
            continue
        main = next((i for i in found if i.kind == "mlp"), found[0])
        layers.append(
            LayerInfo(layer, "moe", main.experts, main.top_k, main.shared_experts,
                      sum(i.routed_expert_params for i in found), stack)
        )
    return sorted(layer for layer in by_layer if layer >= 0), layers


def _stacks(model: nn.Module, routers: list[RouterSpec], infos: list[RouterInfo]) -> list[StackInfo]:
    """Per-stack figures of an encoder-decoder: each stack module's parameters, and its routers' experts."""
    stacks: list[StackInfo] = []
    for name in ("encoder", "decoder"):
        specs = [r for r in routers if r.stack == name]
        mine = [i for i in infos if i.stack == name]
        module = model.get_encoder() if name == "encoder" else model.get_decoder()
        match = _LAYER_STACK_RE.match(specs[0].path) if specs else None
        blocks = model.get_submodule(match.group(1)) if match else None
        count = len(blocks) if isinstance(blocks, nn.ModuleList) else max((r.layer for r in specs), default=-1) + 1
        moe, table = _layer_table(mine, count, name)
        total = sum(p.numel() for p in module.parameters())
        routed = sum(i.routed_expert_params for i in mine)
        inactive = sum(i.routed_expert_params * (1 - min(i.top_k, i.experts) / i.experts) for i in mine if i.experts)
        stacks.append(
            StackInfo(
                name, count, moe, [e.layer for e in table if e.kind == "dense"],
                _uniform([i.experts for i in mine]), _uniform([i.top_k for i in mine]), total, routed,
                round(total - inactive),
            )
        )
    return stacks
