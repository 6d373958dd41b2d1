"""Checkpoints that ship quantized weights (fine-grained FP8, MXFP4, compressed-tensors): what loads here and how.

transformers dequantizes FP8 and MXFP4 to bf16 at load where the machine has no kernel for them (no GPU, no Triton);
the user is told, since routes are then those of the dequantized weights. What cannot load is refused in one
sentence naming the format and what is missing.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from moe_inspect.errors import UserError
from moe_inspect.model.quantize import QuantOptions

# quant_method -> the format's name in messages
PREQUANTIZED: dict[str, str] = {
    "fp8": "fine-grained FP8",
    "mxfp4": "MXFP4",
    "compressed-tensors": "compressed-tensors",
}
# The Python package a format needs before transformers can read it at all.
_FORMAT_PACKAGES = {"compressed-tensors": "compressed_tensors"}


def _has_package(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def prequantized_method(config: Any) -> str | None:
    """The ``quant_method`` of a checkpoint that ships quantized weights (its config's quantization_config)."""
    qc = getattr(config, "quantization_config", None)
    if qc is None and hasattr(config, "get_text_config"):
        qc = getattr(config.get_text_config(decoder=True), "quantization_config", None)
    if qc is None:
        return None
    method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    return str(getattr(method, "value", method)) if method is not None else None


def check_prequantized(model_id: str, method: str | None, options: QuantOptions) -> None:
    """One sentence for what cannot work: quantizing again, or a format whose reader is not installed."""
    if method is None:
        return
    name = PREQUANTIZED.get(method, method)
    if options.enabled:
        raise UserError(f"'{model_id}' is already quantized ({name}); load it without {options.label} quantization.")
    package = _FORMAT_PACKAGES.get(method)
    if package and not _has_package(package):
        raise UserError(
            f"'{model_id}' is a {name} checkpoint; reading it needs the {package.replace('_', '-')} package "
            f"(pip install {package.replace('_', '-')})."
        )


def checkpoint_quantization(
    model_id: str, options: QuantOptions, revision: str | None = None, trust_remote_code: bool = False
) -> str | None:
    """The quant_method a checkpoint ships with (None for plain weights), refused in one sentence where it cannot
    load here. A config that cannot be read is left to ``from_pretrained``, which reports it in its own words."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model_id, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError):
        return None
    method = prequantized_method(config)
    check_prequantized(model_id, method, options)
    return method


def prequantized_note(method: str, model: nn.Module) -> str:
    """Whether the shipped format was kept (a kernel exists here) or dequantized at load, said in one line.

    Judged from the weights themselves (any left in a low-precision dtype or a quantized tensor subclass), since
    each format's config flags it differently (``dequantize``, ``run_compressed``) or drops the config altogether.
    """
    from moe_inspect.model.footprint import is_quantized_tensor

    name = PREQUANTIZED.get(method, method)
    if any(is_quantized_tensor(p) for p in model.parameters()):
        return f"Pre-quantized {name} checkpoint: weights kept in {name}."
    return (
        f"Pre-quantized {name} checkpoint: dequantized to {next(model.parameters()).dtype} at load, since this "
        "machine has no kernel for the format (routes are those of the dequantized weights)."
    )
