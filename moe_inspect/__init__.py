"""moe-inspect: an inference-time routing inspector for Mixture-of-Experts models in transformers.

Data flows down the stages: model string -> config and tokenizer (model.source) -> weights (model.loading, with
LoadOptions) -> routers (model.routers) -> capture a forward (model.capture) -> accumulate (analysis.accumulate)
-> metrics (metrics) -> tables (analysis.tables, io.schemas) -> render/export (render, io.export). ``info``
stops after the routers, on a meta-device model (analysis.info).
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("moe-inspect")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

from moe_inspect.model.options import LoadOptions

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
