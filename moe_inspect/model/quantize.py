"""Quantize the routed experts too, while the checkpoint is read, and measure what that really saved.

transformers 5 stores routed experts as fused 3-D parameters (``experts.gate_up_proj`` [E, 2I, H],
``experts.down_proj`` [E, H, I]; GPT-OSS transposed). Its bitsandbytes integration swaps only exactly-typed
``nn.Linear`` modules, so "4-bit Mixtral-8x7B" keeps 97% of its weights in bf16. Here transformers' own bnb
quantizers are subclassed (and registered under their own ``quant_method``) so that the expert tensors go
through the same per-tensor quantize step as the linears *as each one is read from the checkpoint*: peak memory
is the quantized model plus one layer's full-precision tensor, never the whole bf16 model.

* 4-bit: bitsandbytes' ``quantize_4bit`` op (nf4 or fp4, optional double quantization) at read time, in chunks,
  then bitsandbytes' own ``Bnb4bitParametrization`` dequantizes on access.
* 8-bit: bitsandbytes 0.50 has no parameter API for int8, so the experts are quantized with its row-wise
  ``int8_vectorwise_quant`` (LLM.int8's weight format) and dequantized by the small parametrization below.
* float8: torchao's weight-only float8 through transformers' torchao integration, targeting the expert tensors
  and the linears by fully-qualified name (``FqnToConfig``).

What it all costs in memory is measured in ``footprint``; checkpoints that ship quantized are ``prequantized``.
Routers always stay in full precision: their linears are in the skip list and their parameters are never
expert tensors, so captured routes are those of the model's own (unquantized) routers.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from moe_inspect.errors import UserError
from moe_inspect.model.options import QUANT_TYPES, LoadOptions
from moe_inspect.model.routers import RouterSpec, find_routers, moe_block, router_linear_names

# bitsandbytes' defaults for parameters: 64-element blocks for 4-bit absmax, 256 absmax values per nested block.
BNB_BLOCKSIZE = 64
BNB_NESTED_BLOCKSIZE = 256
_METHOD_4BIT = "moe_inspect_bnb_4bit"
_METHOD_8BIT = "moe_inspect_bnb_8bit"


@dataclass(frozen=True)
class QuantOptions:
    """How to quantize on load, read from the quantization fields of ``LoadOptions`` and checked once.

    ``bits`` 4 or 8 selects bitsandbytes; ``float8`` selects torchao weight-only float8; neither: no quantization.
    """

    bits: int | None = None
    quant_type: str = "nf4"
    double_quant: bool = False
    float8: bool = False

    def __post_init__(self) -> None:
        if self.bits not in (None, 4, 8):
            raise UserError(f"Quantization bits must be 4 or 8, not {self.bits}.")
        if self.bits and self.float8:
            raise UserError("Choose one of 4-bit, 8-bit and float8 quantization.")
        if self.quant_type not in QUANT_TYPES:
            raise UserError(f"The `bnb_4bit_quant_type` must be nf4 or fp4, not '{self.quant_type}'.")
        if self.bits != 4 and (self.quant_type != "nf4" or self.double_quant):
            raise UserError("The `bnb_4bit_quant_type` and `double_quant` only apply to 4-bit loading.")

    @classmethod
    def from_load_options(cls, options: LoadOptions) -> QuantOptions:
        """The quantization part of one ``LoadOptions`` (which stays free of torch, so holds plain fields and
        has already refused contradictory ones)."""
        return cls(
            bits=4 if options.load_in_4bit else 8 if options.load_in_8bit else None,
            quant_type=options.bnb_4bit_quant_type,
            double_quant=options.double_quant,
            float8=options.quantize == "float8",
        )

    @property
    def enabled(self) -> bool:
        return self.bits is not None or self.float8

    @property
    def label(self) -> str | None:
        """'4bit-nf4', '4bit-fp4-dq', '8bit', 'float8' or None: the run metadata's quantization field."""
        if self.float8:
            return "float8"
        if self.bits == 8:
            return "8bit"
        if self.bits == 4:
            return f"4bit-{self.quant_type}" + ("-dq" if self.double_quant else "")
        return None


# ------------------------------------------------------------------------------------------ what gets quantized


def routed_expert_modules(model: nn.Module, routers: list[RouterSpec]) -> list[nn.Module]:
    """The routed-experts module beside each router (``mlp.experts`` and kin), where it has one."""
    found: dict[int, nn.Module] = {}
    for spec in routers:
        experts = getattr(moe_block(model, spec), "experts", None)
        if isinstance(experts, nn.Module):
            found[id(experts)] = experts
    return list(found.values())


def expert_param_names(model: nn.Module, routers: list[RouterSpec]) -> list[str]:
    """Full names of the fused expert tensors: the floating 3-D parameters of each experts module.

    2-D expert biases (GPT-OSS) stay in full precision, as biases of linears do under bitsandbytes.
    """
    names = {id(module): name for name, module in model.named_modules()}
    found: list[str] = []
    for experts in routed_expert_modules(model, routers):
        prefix = names[id(experts)]
        for pname, param in experts.named_parameters(recurse=False):
            if param.dim() == 3 and param.is_floating_point():
                found.append(f"{prefix}.{pname}")
    return found


def _skeleton(model_id: str, revision: str | None, trust_remote_code: bool) -> nn.Module:
    """The model built on the meta device: module names without reading or allocating any weight."""
    from transformers import AutoConfig

    from moe_inspect.model.source import skeleton_model

    config = AutoConfig.from_pretrained(model_id, revision=revision, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        return skeleton_model(config, trust_remote_code)


def _require_backend(float8: bool) -> None:
    try:
        if float8:
            import torchao  # noqa: F401
        else:
            import bitsandbytes  # noqa: F401
    except ImportError as exc:
        what, package = ("Float8 quantization", "torchao") if float8 else ("4-bit and 8-bit loading", "bitsandbytes")
        raise UserError(f"{what} needs {package}: pip install 'moe-inspect[quant]'.") from exc


def quantization_config(
    model_id: str,
    options: QuantOptions,
    revision: str | None = None,
    trust_remote_code: bool = False,
    compute_dtype: torch.dtype = torch.bfloat16,
) -> Any:
    """The transformers quantization config for ``options``: routers skipped, expert tensors included.

    Router linears are found on a meta-device copy (nothing is read twice); transformers' bnb integration
    would otherwise quantize the plain ``nn.Linear`` inside DBRX, HunYuan, Gemma-4, JetMoE, AfMoE, LongCat,
    Doge and Zaya routers (LongCat then crashes).
    """
    _require_backend(options.float8)
    skeleton = _skeleton(model_id, revision, trust_remote_code)
    routers = find_routers(skeleton)
    skip = [*router_linear_names(skeleton, routers), "lm_head"]
    experts, linears = quantized_names(skeleton, routers)
    if options.float8:
        return _torchao_float8_config([*experts, *linears], skip)
    _register()
    return bnb_config(options, compute_dtype, skip, experts)


def _torchao_float8_config(targets: list[str], skip: list[str]) -> Any:
    """Weight-only float8 on exactly ``targets`` (expert tensors and linears), named in full."""
    from torchao.quantization import Float8WeightOnlyConfig, FqnToConfig
    from transformers import TorchAoConfig

    return TorchAoConfig(
        quant_type=FqnToConfig(dict.fromkeys(targets, Float8WeightOnlyConfig())), modules_to_not_convert=skip
    )


# --------------------------------------------------------------------------- bitsandbytes on fused expert tensors


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


def quantized_names(model: nn.Module, routers: list[RouterSpec]) -> tuple[list[str], list[str]]:
    """(expert tensor names, linear module names) that 4-bit/8-bit/float8 loading quantizes.

    Linears follow transformers' bitsandbytes rule (exactly ``nn.Linear``), minus router linears and lm_head.
    """
    skip = {*router_linear_names(model, routers)}
    head = model.get_output_embeddings()
    linears = [
        name for name, module in model.named_modules() if type(module) is nn.Linear and name not in skip
        and module is not head
    ]
    keep_fp32 = getattr(model, "_keep_in_fp32_modules", None) or []
    linears = [n for n in linears if not any(re.search(rf"(^|\.){re.escape(k)}(\.|$)", n) for k in keep_fp32)]
    return expert_param_names(model, routers), linears


def no_grad_context(model: nn.Module) -> Any:
    """``torch.inference_mode()``, or ``torch.no_grad()`` for models holding tensor subclasses.

    torchao's Float8Tensor weights were made outside inference mode, and viewing them inside it raises
    "Cannot set version_counter for inference tensor" (torchao 0.18, torch 2.13).
    """
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    if any(is_traceable_wrapper_subclass(p) for p in model.parameters()):
        return torch.no_grad()
    return torch.inference_mode()


def quantized_forward_error(options: QuantOptions, exc: RuntimeError) -> Exception:
    """The sentence for a first forward that fails inside a quantization backend; other errors pass through.

    bitsandbytes 0.50's CPU int8 matmul fails on the MLA attention of DeepSeek-V3 and LongCat (``expand_kv``),
    with plain transformers too.
    """
    if not options.enabled:
        return exc
    first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return UserError(
        f"The model loaded in {options.label} but its first forward failed inside the quantization backend "
        f"({first[:120]}); try another quantization mode."
    )
