"""What every run.json says about where it ran and on what: package versions, Python, platform, the loaded model."""

from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from moe_inspect.model.loading import LoadedModel

_PACKAGES = ("moe-inspect", "torch", "transformers", "accelerate", "tokenizers", "bitsandbytes", "pandas")


def package_versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for name in _PACKAGES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def environment() -> dict[str, Any]:
    """run.json's ``packages``, ``python`` and ``platform``, in that order."""
    return {"packages": package_versions(), "python": platform.python_version(), "platform": platform.platform()}


def model_identity(loaded: LoadedModel) -> dict[str, Any]:
    """run.json's ``model``, ``model_type``, ``revision``, ``dtype``, ``device`` and ``quantization``, in that order."""
    return {
        "model": loaded.model_id,
        "model_type": loaded.model_type,
        "revision": loaded.revision,
        "dtype": loaded.dtype,
        "device": loaded.device,
        "quantization": loaded.quantization,
    }
