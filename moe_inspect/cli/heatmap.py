"""The load heatmap (``--plot``) and report folder (``--out``) that balance and ingest both offer."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moe_inspect.cli.common import Output, save
from moe_inspect.errors import UserError

if TYPE_CHECKING:
    import pandas as pd


def need_matplotlib() -> None:
    """``--plot`` is refused before any work when its optional dependency is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UserError("--plot needs matplotlib: pip install 'moe-inspect[plot]'.") from None


def check_plot(plot: Path) -> None:
    """The ``--plot`` path can be written and names a format matplotlib writes."""
    from moe_inspect.io.export import check_output
    from moe_inspect.render.balance import plot_format

    check_output(plot, "--plot")
    plot_format(plot)


def save_report_and_heatmap(
    write: Callable[[Path], Any],
    out_dir: Path | None,
    experts: Callable[[], pd.DataFrame],
    plot: Path | None,
    title: str,
    output: Output,
) -> list[str | None]:
    """Each output written on its own: a failure is reported (returned) without stopping the others."""
    from moe_inspect.render.balance import write_heatmap_png

    return [
        save(write, out_dir, "--out", output) if out_dir is not None else None,
        save(lambda path: write_heatmap_png(experts(), path, title=title), plot, "--plot", output)
        if plot is not None
        else None,
    ]
