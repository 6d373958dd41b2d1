"""What a model really holds in memory after loading, and what each loading mode will hold, from the config alone.

transformers' ``get_memory_footprint()`` counts nominal shapes: wrong for torchao tensor subclasses (an 8-bit-expert
model reported its bf16 size) and blind to the absmax/scale tensors of bitsandbytes weights. Here the real storage
is counted, each tensor once, split by role (experts, routers, embeddings, other).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from moe_inspect.model.bnb_experts import BNB_BLOCKSIZE, BNB_NESTED_BLOCKSIZE, Int8RowwiseParametrization
from moe_inspect.model.quantize import quantized_names, routed_expert_modules
from moe_inspect.model.routers import RouterSpec
from moe_inspect.units import human_bytes

_QUANTIZED_DTYPES = {torch.uint8, torch.int8, torch.float8_e4m3fn, torch.float8_e5m2}


def tensor_storage_bytes(tensor: torch.Tensor) -> int:
    """Bytes a tensor really holds: the inner tensors of a wrapper subclass (torchao), else numel × itemsize."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    if is_traceable_wrapper_subclass(tensor):
        inner, _ = tensor.__tensor_flatten__()
        return sum(tensor_storage_bytes(getattr(tensor, name)) for name in inner)
    if tensor.device.type == "meta":
        return 0
    return tensor.numel() * tensor.element_size()


def _quant_state_tensors(state: Any) -> Iterable[torch.Tensor]:
    """The tensors of a bitsandbytes QuantState (absmax, code, offset, nested state)."""
    while state is not None:
        for name in ("absmax", "code", "offset"):
            value = getattr(state, name, None)
            if isinstance(value, torch.Tensor):
                yield value
        state = getattr(state, "state2", None) if getattr(state, "nested", False) else None


def is_quantized_tensor(tensor: torch.Tensor) -> bool:
    """Stored in a packed or low-precision form (int8/uint8/float8 storage or a tensor subclass such as torchao's)."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    return is_traceable_wrapper_subclass(tensor) or tensor.dtype in _QUANTIZED_DTYPES


@dataclass
class Footprint:
    """Bytes of real storage after loading, split the way a user asks about them."""

    total: int = 0
    experts: int = 0
    quantized: int = 0
    full_precision: dict[str, int] = field(default_factory=dict)  # role -> bytes still in a float dtype

    def add(self, role: str, nbytes: int, quantized: bool) -> None:
        self.total += nbytes
        if role == "experts":
            self.experts += nbytes
        if quantized:
            self.quantized += nbytes
        else:
            self.full_precision[role] = self.full_precision.get(role, 0) + nbytes


def _roles(model: nn.Module, routers: list[RouterSpec]) -> dict[int, str]:
    """id(module) -> 'routers', 'experts' or 'embeddings' for every module under those parts."""
    roles: dict[int, str] = {}
    parts: list[tuple[str, nn.Module | None]] = [
        ("embeddings", model.get_input_embeddings()),
        ("embeddings", model.get_output_embeddings()),
        *(("experts", m) for m in routed_expert_modules(model, routers)),
        *(("routers", spec.module) for spec in routers),
    ]
    for role, part in parts:
        if part is not None:
            roles.update({id(m): role for m in part.modules()})
    return roles


def measure_footprint(model: nn.Module, routers: list[RouterSpec]) -> Footprint:
    """Real storage of parameters, buffers and quantization states, each counted once.

    transformers' ``get_memory_footprint()`` counts nominal shapes, which is wrong for torchao subclasses and
    misses the absmax/scale tensors of quantized weights.
    """
    roles = _roles(model, routers)
    seen: set[int] = set()
    result = Footprint()

    def add(role: str, tensor: torch.Tensor, quantized: bool) -> None:
        if id(tensor) in seen:
            return
        seen.add(id(tensor))
        result.add(role, tensor_storage_bytes(tensor), quantized)

    for module in model.modules():
        role = roles.get(id(module), "other")
        for tensor in [*module._parameters.values(), *module._buffers.values()]:
            if tensor is None:
                continue
            # row_absmax of the int8 parametrization is a float buffer, but it is part of the quantized weight
            add(role, tensor, is_quantized_tensor(tensor) or isinstance(module, Int8RowwiseParametrization))
            for state_tensor in _quant_state_tensors(getattr(tensor, "quant_state", None)):
                add(role, state_tensor, True)
            scb = getattr(tensor, "SCB", None)
            if isinstance(scb, torch.Tensor):
                add(role, scb, True)
        for state_tensor in _quant_state_tensors(getattr(module, "quant_state", None)):
            add(role, state_tensor, True)
        # Linear8bitLt moves its row scales from the weight to its matmul state on the first forward.
        scb = getattr(getattr(module, "state", None), "SCB", None)
        if isinstance(scb, torch.Tensor):
            add(role, scb, True)
    return result


_ROLE_NAMES = {"routers": "routers", "embeddings": "embeddings and LM head", "experts": "experts", "other": "other"}


def quantization_report(model: nn.Module, routers: list[RouterSpec], label: str | None = None) -> str:
    """One line: real footprint, the experts' share of it, and what stayed in full precision.

    Said plainly when the routed experts were not quantized (a checkpoint or backend that leaves them alone),
    since that is where nearly all of an MoE model's memory goes.
    """
    fp = measure_footprint(model, routers)
    experts_fp = fp.full_precision.get("experts", 0)
    share = f"{fp.experts / fp.total:.0%}" if fp.total else "0%"
    kept = ", ".join(
        f"{_ROLE_NAMES[role]} {human_bytes(n)}" for role, n in sorted(fp.full_precision.items(), key=lambda x: -x[1])
    )
    head = f"{label}: " if label else ""
    if fp.experts and experts_fp == fp.experts:
        return (
            f"{head}{human_bytes(fp.total)} in memory; the routed experts were NOT quantized "
            f"({human_bytes(fp.experts)}, {share}); kept in full precision: {kept}."
        )
    return (
        f"{head}{human_bytes(fp.total)} in memory (real storage), routed experts {human_bytes(fp.experts)} of it "
        f"({share}), quantized; kept in full precision: {kept or 'nothing'}."
    )


# ----------------------------------------------------------------------------------- predicted, from the config

PREDICTED_MODES = ("bf16", "8bit", "4bit-nf4", "4bit-nf4-dq", "float8")


def quantized_tensor_bytes(numel: int, last_dim: int, mode: str) -> int:
    """Bytes one weight tensor takes in ``mode``, scales included (bitsandbytes' and torchao's layouts)."""
    rows = numel // max(last_dim, 1)
    blocks = math.ceil(numel / BNB_BLOCKSIZE)
    if mode == "bf16":
        return 2 * numel
    if mode in ("8bit", "float8"):  # one int8/fp8 per weight + one float32 scale per row
        return numel + 4 * rows
    if mode.endswith("-dq"):  # uint8 absmax per block, float32 absmax per 256 blocks, 256-entry nested code
        nested = math.ceil(blocks / BNB_NESTED_BLOCKSIZE)
        return math.ceil(numel / 2) + blocks + 4 * nested + 4 * 256 + 4 + 4 * 16
    return math.ceil(numel / 2) + 4 * blocks + 4 * 16  # packed nibbles, float32 absmax per block, 16-entry code


def predicted_footprints(model: nn.Module, routers: list[RouterSpec]) -> dict[str, int]:
    """Weight bytes of each loading mode, from a (meta-device) model: what ``info --json`` reports.

    Everything not quantized stays bf16; buffers (RoPE tables) are not weights and are left out.
    """
    experts, linears = quantized_names(model, routers)
    quantized = {*experts, *(f"{name}.weight" for name in linears)}
    # transformers upcasts these to float32 whenever it loads in bf16 (DeepSeek-V3's router weight)
    strict = getattr(model, "_keep_in_fp32_modules_strict", None) or []
    fp32 = [re.compile(rf"(^|\.){re.escape(k)}($|\.)") for k in strict]
    totals = dict.fromkeys(PREDICTED_MODES, 0)
    seen: set[int] = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            continue
        seen.add(id(param))
        for mode in PREDICTED_MODES:
            if name in quantized:
                totals[mode] += quantized_tensor_bytes(param.numel(), param.shape[-1], mode)
            else:
                totals[mode] += (4 if any(p.search(name) for p in fp32) else 2) * param.numel()
    return totals
