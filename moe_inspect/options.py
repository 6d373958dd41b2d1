"""What to load, as one value: the API, the loader and every CLI command pass this instead of nine arguments.

Kept free of torch and transformers imports so the CLI can build it before deciding to load anything.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

DTYPE_NAMES = ("auto", "float32", "bfloat16", "float16")


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

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))
