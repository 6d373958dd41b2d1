"""What ``moe-inspect info`` reports about a model, as plain values: the counting lives in ``info``, the
rendering in ``render.info`` and ``render.html.info``; ``ModelInfo.to_dict`` is the ``--json`` object."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class RouterInfo:
    """One router's share of the parameter count."""

    layer: int
    kind: str
    path: str
    experts: int
    top_k: int
    shared_experts: int
    routed_expert_params: int
    stack: str = "decoder"


@dataclass
class StackInfo:
    """One stack of an encoder-decoder: its MoE and dense blocks and its own parameter figures."""

    stack: str  # "encoder" or "decoder"
    num_layers: int
    moe_layers: list[int]
    dense_layers: list[int]
    num_experts: int | list[int]
    top_k: int | list[int]
    total_params: int
    routed_expert_params: int
    active_params: int


@dataclass
class LayerInfo:
    """One decoder layer; an MoE layer's figures are those of its MLP router (JetMoE also has MoA)."""

    layer: int
    kind: str  # "moe" or "dense"
    experts: int
    top_k: int
    shared_experts: int
    routed_expert_params: int
    stack: str = "decoder"


@dataclass
class ModelInfo:
    """Everything ``moe-inspect info`` reports; ``to_dict`` is the ``--json`` object."""

    model_type: str
    model_class: str
    num_layers: int
    moe_layers: list[int]
    dense_layers: list[int]
    num_experts: int | list[int]  # one int when every MoE layer agrees, else one value per MoE layer
    top_k: int | list[int]
    shared_experts: int | list[int]
    scoring: str | None
    selection: str | None
    routing_rule: str
    total_params: int
    routed_expert_params: int
    active_params: int
    active_params_excl_input_embedding: int
    active_params_non_embedding: int
    input_embedding_params: int
    lm_head_params: int
    tied_embeddings: bool
    activation_ratio: float
    memory: dict[str, dict[str, int]]
    layers: list[LayerInfo] = field(default_factory=list)
    routers: list[RouterInfo] = field(default_factory=list)
    heuristic: bool = False
    notes: list[str] = field(default_factory=list)
    # bytes in memory per loading mode (bf16, 8bit, 4bit-nf4, 4bit-nf4-dq, float8), scales included
    load_footprint: dict[str, int] = field(default_factory=dict)
    # Encoder-decoders only: one entry per stack; num_layers, moe_layers and dense_layers then describe the decoder.
    stacks: list[StackInfo] = field(default_factory=list)

    @property
    def is_moe(self) -> bool:
        return bool(self.moe_layers) or any(s.moe_layers for s in self.stacks)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data; byte counts are ints (int4 rounds up half bytes)."""
        return asdict(self)
