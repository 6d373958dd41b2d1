"""bitsandbytes on transformers 5's fused expert tensors: quantize each one as it is read, dequantize on access.

transformers' own bitsandbytes integration swaps only exactly-typed ``nn.Linear``; the quantizers here subclass
its two quantizers (registered under their own ``quant_method``) so that ``experts.gate_up_proj`` and
``experts.down_proj`` go through the same per-tensor step. ``quantize`` decides what is quantized; this module
holds how.
"""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from moe_inspect.model.quantize import QuantOptions

# bitsandbytes' defaults for parameters: 64-element blocks for 4-bit absmax, 256 absmax values per nested block.
BNB_BLOCKSIZE = 64
BNB_NESTED_BLOCKSIZE = 256

_METHOD_4BIT = "moe_inspect_bnb_4bit"
_METHOD_8BIT = "moe_inspect_bnb_8bit"




class Int8RowwiseParametrization(nn.Module):
    """Dequantize an int8 tensor quantized row-wise (one absmax per row of the last dimension) on access.

    The scale is a buffer so that it moves with the module and counts in the footprint.
    """

    def __init__(self, row_absmax: torch.Tensor, dtype: torch.dtype) -> None:
        super().__init__()
        self.register_buffer("row_absmax", row_absmax)
        self.dtype = dtype

    @torch.no_grad()
    def forward(self, quantized: torch.Tensor) -> torch.Tensor:
        # In the compute dtype, so no float32 copy of a whole layer's experts is made on the way.
        scale = (self.row_absmax / 127.0).to(self.dtype).view(*quantized.shape[:-1], 1)
        return quantized.to(self.dtype) * scale


@functools.cache
def _flat_4bit_class() -> type:
    from bitsandbytes.nn.parametrize import Bnb4bitParametrization

    class Flat4bitParametrization(Bnb4bitParametrization):
        """bitsandbytes' 4-bit parametrization over a flattened tensor, handing back the original shape."""

        def __init__(self, quant_state: Any, shape: torch.Size) -> None:
            super().__init__(quant_state)
            self.shape = shape

        def forward(self, quantized_param: torch.Tensor) -> torch.Tensor:
            return super().forward(quantized_param).view(self.shape)

    return Flat4bitParametrization


def flat_4bit_parametrization(quant_state: Any, shape: torch.Size) -> nn.Module:
    """bitsandbytes' Bnb4bitParametrization, reshaping its flat output (bitsandbytes imported on first use)."""
    return _flat_4bit_class()(quant_state, shape)


# Elements quantized per call: bitsandbytes' CPU kernels make several float32 temporaries of their input, so a whole
# [E, 2I, H] tensor at once would cost several times its bf16 size on top; 4M elements keep that to tens of MB.
QUANT_CHUNK = 1 << 22


def quantize_expert_tensor(value: torch.Tensor, bits: int, quant_type: str, double_quant: bool) -> tuple[Any, Any]:
    """(packed data, state) for one fused expert tensor; the state is what dequantizes it later."""
    import bitsandbytes.functional as bnb_f

    if bits == 4:
        # Flattened: bitsandbytes 0.50's CPU (de)quantization garbles tensors whose last dimension is not a
        # multiple of the block size (mean error 0.36 instead of 0.09 on [8, 64, 32]); 1-D is exact on both.
        flat = value.reshape(-1)
        # Written into tensors allocated once: concatenating per-chunk results fragments the heap and keeps RSS high.
        quantize = torch.ops.bitsandbytes.quantize_4bit.default
        packed = torch.empty(((flat.numel() + 1) // 2, 1), dtype=torch.uint8, device=value.device)
        absmax = torch.empty(math.ceil(flat.numel() / BNB_BLOCKSIZE), dtype=torch.float32, device=value.device)
        for i in range(0, flat.numel(), QUANT_CHUNK):
            out, chunk_absmax = quantize(flat[i : i + QUANT_CHUNK], BNB_BLOCKSIZE, quant_type, torch.uint8)
            packed[i // 2 : i // 2 + out.shape[0]] = out.view(-1, 1)
            absmax[i // BNB_BLOCKSIZE : i // BNB_BLOCKSIZE + chunk_absmax.numel()] = chunk_absmax
            del out, chunk_absmax
        code = bnb_f.get_4bit_type(quant_type, device=value.device)
        # The same QuantState bitsandbytes' quantize_4bit builds (nested statistics included).
        if double_quant:
            offset = absmax.mean()
            nested, state2 = bnb_f.quantize_blockwise(absmax - offset, blocksize=BNB_NESTED_BLOCKSIZE)
            state = bnb_f.QuantState(
                absmax=nested, shape=flat.shape, dtype=value.dtype, blocksize=BNB_BLOCKSIZE, code=code,
                quant_type=quant_type, offset=offset, state2=state2,
            )
        else:
            state = bnb_f.QuantState(
                absmax=absmax, shape=flat.shape, dtype=value.dtype, blocksize=BNB_BLOCKSIZE, code=code,
                quant_type=quant_type,
            )
        return packed, (state, value.shape)
    rows2d = value.reshape(-1, value.shape[-1])
    step = max(1, QUANT_CHUNK // rows2d.shape[1])
    rows = torch.empty(rows2d.shape, dtype=torch.int8, device=value.device)
    row_absmax = torch.empty(rows2d.shape[0], dtype=torch.float32, device=value.device)
    for i in range(0, rows2d.shape[0], step):
        chunk_rows, chunk_absmax, _ = bnb_f.int8_vectorwise_quant(rows2d[i : i + step])
        rows[i : i + step] = chunk_rows
        row_absmax[i : i + step] = chunk_absmax
        del chunk_rows, chunk_absmax
    return rows.view(value.shape), (row_absmax, value.dtype)


def attach_dequantization(module: nn.Module, name: str, bits: int, state: Any) -> None:
    """Register the parametrization that turns the packed parameter back into the full-precision tensor."""
    from bitsandbytes.nn import parametrize as bnb_p

    param = getattr(module, name)
    if bits == 4:
        quant_state, shape = state
        parametrization: nn.Module = flat_4bit_parametrization(quant_state, shape)
    else:
        row_absmax, dtype = state
        parametrization = Int8RowwiseParametrization(row_absmax.to(param.device), dtype)
    torch.nn.utils.parametrize.register_parametrization(module, name, parametrization, unsafe=True)
    # Dequantize once per forward of the experts module, however often the forward indexes the tensor.
    module.register_forward_pre_hook(bnb_p._enable_parametrization_cache)
    module.register_forward_hook(bnb_p._disable_parametrization_cache, always_call=True)


_CLASSES: dict[str, type] = {}


def _register() -> None:
    """Register the config and the two quantizers with transformers, once per process."""
    if _CLASSES:
        return
    from transformers import BitsAndBytesConfig
    from transformers.core_model_loading import ConversionOps
    from transformers.quantizers.auto import (
        AUTO_QUANTIZATION_CONFIG_MAPPING,
        AUTO_QUANTIZER_MAPPING,
    )
    from transformers.quantizers.quantizer_bnb_4bit import Bnb4BitHfQuantizer
    from transformers.quantizers.quantizer_bnb_8bit import Bnb8BitHfQuantizer
    from transformers.quantizers.quantizers_utils import get_module_from_name, should_convert_module

    class ExpertQuantize(ConversionOps):
        """Expert tensors: packed here, parametrized after loading; everything else: transformers' own op."""

        def __init__(self, quantizer: Any, linear_op: ConversionOps) -> None:
            self.quantizer = quantizer
            self.linear_op = linear_op

        def convert(self, input_dict: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
            result: dict[str, Any] = {}
            rest: dict[str, Any] = {}
            for name, value in input_dict.items():
                if name not in self.quantizer.expert_names:
                    rest[name] = value
                    continue
                value = value[0] if isinstance(value, list) else value
                packed, state = quantize_expert_tensor(value, self.quantizer.bits, *self.quantizer.bnb_4bit_options)
                self.quantizer.expert_states[name] = state
                result[name] = nn.Parameter(packed, requires_grad=False)
            if rest:
                result.update(self.linear_op.convert(rest, **kwargs))
            return result

    class ExpertsMixin:
        """Adds the fused expert tensors to what a transformers bnb quantizer quantizes on load."""

        bits: int

        def _process_model_before_weight_loading(self, model: nn.Module, device_map: Any, **kwargs: Any) -> None:
            super()._process_model_before_weight_loading(model, device_map, **kwargs)  # type: ignore[misc]
            config = self.quantization_config  # type: ignore[attr-defined]
            self.expert_names = {
                n for n in config.expert_params if should_convert_module(n, self.modules_to_not_convert)  # type: ignore[attr-defined]
            }
            self.bnb_4bit_options = (config.bnb_4bit_quant_type, config.bnb_4bit_use_double_quant)
            self.expert_states: dict[str, Any] = {}

        def param_needs_quantization(self, model: nn.Module, param_name: str, **kwargs: Any) -> bool:
            return param_name in self.expert_names or super().param_needs_quantization(  # type: ignore[misc]
                model, param_name, **kwargs
            )

        def get_quantize_ops(self) -> Any:
            return ExpertQuantize(self, super().get_quantize_ops())  # type: ignore[misc]

        def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> Any:
            for name, state in self.expert_states.items():
                module, pname = get_module_from_name(model, name)
                attach_dequantization(module, pname, self.bits, state)
            self.expert_states = {}
            return super()._process_model_after_weight_loading(model, **kwargs)  # type: ignore[misc]

    class Experts4bitQuantizer(ExpertsMixin, Bnb4BitHfQuantizer):
        bits = 4

    class Experts8bitQuantizer(ExpertsMixin, Bnb8BitHfQuantizer):
        bits = 8

    class Config(BitsAndBytesConfig):
        """BitsAndBytesConfig plus the expert tensor names, under its own quant_method."""

        def __init__(self, options: QuantOptions, compute_dtype: torch.dtype, skip: list[str], experts: list[str]):
            super().__init__(
                load_in_4bit=options.bits == 4,
                load_in_8bit=options.bits == 8,
                bnb_4bit_quant_type=options.quant_type,
                bnb_4bit_use_double_quant=options.double_quant,
                bnb_4bit_compute_dtype=compute_dtype,
                llm_int8_skip_modules=skip,
            )
            self.expert_params = list(experts)
            self.quant_method = _METHOD_4BIT if options.bits == 4 else _METHOD_8BIT

    for method, quantizer in ((_METHOD_4BIT, Experts4bitQuantizer), (_METHOD_8BIT, Experts8bitQuantizer)):
        AUTO_QUANTIZATION_CONFIG_MAPPING.setdefault(method, Config)
        AUTO_QUANTIZER_MAPPING.setdefault(method, quantizer)
    _CLASSES["config"] = Config


def bnb_config(
    options: QuantOptions, compute_dtype: torch.dtype, skip: list[str], experts: list[str]
) -> Any:
    """A BitsAndBytesConfig that also quantizes ``experts`` (full parameter names) and skips ``skip``."""
    _register()
    return _CLASSES["config"](options, compute_dtype, skip, experts)
