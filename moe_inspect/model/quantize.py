"""Quantize the routed experts too, while the checkpoint is read, and measure what that really saved.

transformers 5 stores routed experts as fused 3-D parameters (``experts.gate_up_proj`` [E, 2I, H],
``experts.down_proj`` [E, H, I]; GPT-OSS transposed). Its bitsandbytes integration swaps only exactly-typed
``nn.Linear`` modules, so "4-bit Mixtral-8x7B" keeps 97% of its weights in bf16. Here transformers' own bnb
quantizers are subclassed (and registered under their own ``quant_method``) so that the expert tensors go
through the same per-tensor quantize step as the linears *as each one is read from the checkpoint*: peak memory
is the quantized model plus one layer's full-precision tensor, never the whole bf16 model.

How bitsandbytes is applied to the fused tensors lives in ``bnb_experts``:

* 4-bit: bitsandbytes' ``quantize_4bit`` op (nf4 or fp4, optional double quantization) at read time, in chunks,
  then bitsandbytes' own ``Bnb4bitParametrization`` dequantizes on access.
* 8-bit: bitsandbytes 0.50 has no parameter API for int8, so the experts are quantized with its row-wise
  ``int8_vectorwise_quant`` (LLM.int8's weight format) and dequantized by a small parametrization.
* float8: torchao's weight-only float8 through transformers' torchao integration, targeting the expert tensors
  and the linears by fully-qualified name (``FqnToConfig``).

What it all costs in memory is measured in ``footprint``; checkpoints that ship quantized are ``prequantized``.
Routers always stay in full precision: their linears are in the skip list and their parameters are never
expert tensors, so captured routes are those of the model's own (unquantized) routers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from moe_inspect.errors import UserError
from moe_inspect.model.bnb_experts import bnb_config
from moe_inspect.model.options import QUANT_TYPES, LoadOptions
from moe_inspect.model.routers import RouterSpec, find_routers, moe_block, router_linear_names


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
    return bnb_config(options, compute_dtype, skip, experts)


def _torchao_float8_config(targets: list[str], skip: list[str]) -> Any:
    """Weight-only float8 on exactly ``targets`` (expert tensors and linears), named in full."""
    from torchao.quantization import Float8WeightOnlyConfig, FqnToConfig
    from transformers import TorchAoConfig

    return TorchAoConfig(
        quant_type=FqnToConfig(dict.fromkeys(targets, Float8WeightOnlyConfig())), modules_to_not_convert=skip
    )


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
