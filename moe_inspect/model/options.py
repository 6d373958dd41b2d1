"""What to load, as one value: the API, the loader and every CLI command pass this instead of nine arguments.

Kept free of torch and transformers imports so the CLI can build it before deciding to load anything.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from moe_inspect.errors import UserError

DTYPE_NAMES = ("auto", "float32", "bfloat16", "float16")
QUANT_TYPES = ("nf4", "fp4")  # bitsandbytes' 4-bit data types
QUANTIZE_METHODS = ("float8",)  # quantization that is not bitsandbytes (torchao)


@dataclass(frozen=True)
class LoadOptions:
    """A model reference and how to load it; ``model=None`` means $MOE_INSPECT_MODEL, else the demo model."""

    model: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    revision: str | None = None
    trust_remote_code: bool = False
    device_map: str | None = None
    load_in_4bit: bool = False
    load_in_8bit: bool = False
    # 4-bit only: nf4 or fp4, and whether the 4-bit scales are quantized too (moe_inspect.model.quantize)
    bnb_4bit_quant_type: str = "nf4"
    double_quant: bool = False
    quantize: str | None = None  # "float8": torchao weight-only float8 (instead of bitsandbytes)

    def __post_init__(self) -> None:
        """Contradictory quantization fields fail here, as the value is made: before any file is read."""
        if self.load_in_4bit and self.load_in_8bit:
            raise UserError("Choose one of `load_in_4bit` and `load_in_8bit`.")
        if self.quantize is not None and self.quantize not in QUANTIZE_METHODS:
            raise UserError(f"The `quantize` must be one of {', '.join(QUANTIZE_METHODS)}, not '{self.quantize}'.")
        if self.quantize and (self.load_in_4bit or self.load_in_8bit):
            raise UserError("Choose one of `quantize` and `load_in_4bit`/`load_in_8bit`.")
        if self.bnb_4bit_quant_type not in QUANT_TYPES:
            raise UserError(f"The `bnb_4bit_quant_type` must be nf4 or fp4, not '{self.bnb_4bit_quant_type}'.")
        if not self.load_in_4bit and (self.bnb_4bit_quant_type != "nf4" or self.double_quant):
            raise UserError("The `bnb_4bit_quant_type` and `double_quant` only apply to 4-bit loading.")

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))
