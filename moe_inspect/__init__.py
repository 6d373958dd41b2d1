"""moe-inspect: an inference-time routing inspector for Mixture-of-Experts models in transformers.

Data flows: model string -> config and tokenizer (source) -> weights (loading, with LoadOptions) -> find
routers (routers) -> capture a forward (capture) -> accumulate (accumulate) -> metrics (metrics) -> tables
(tables, schemas) -> render/export (render, export). ``info`` stops after routers, on a meta-device model.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("moe-inspect")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

from moe_inspect.options import LoadOptions

__all__ = ["Inspector", "LoadOptions", "__version__", "compare_runs", "load"]


def __getattr__(name: str) -> object:
    # Importing torch/transformers costs seconds; `moe-inspect --help` and `info` should not pay twice.
    if name in {"load", "Inspector"}:
        from moe_inspect import api

        return getattr(api, name)
    if name == "compare_runs":
        from moe_inspect.analysis.compare_runs import compare_runs

        return compare_runs
    raise AttributeError(name)
