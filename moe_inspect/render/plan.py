"""`plan` in the terminal: per-layer per-GPU load and traffic before and after the placement."""

from __future__ import annotations

import math

from rich.console import Console
from rich.table import Table

from moe_inspect.analysis.plan import PlanReport

_COLUMNS = (
    ("max/mean", "max_over_mean_before", "max_over_mean_after", "{:.2f}"),
    ("balancedness", "balancedness_before", "balancedness_after", "{:.3f}"),
    ("cross-GPU", "cross_gpu_before", "cross_gpu_after", "{:.1%}"),
    ("cross-node", "cross_node_before", "cross_node_after", "{:.1%}"),
)


def _fmt(fmt: str, value: float) -> str:
    return "–" if isinstance(value, float) and math.isnan(value) else fmt.format(value)


def render_plan(report: PlanReport, console: Console) -> None:
    """One row per MoE layer (before → after), then the whole-model figures."""
    run, frame = report.run, report.layers
    title = (
        f"EPLB placement ({run['policy']}): {run['experts']} experts + {run['redundant_experts']} redundant "
        f"on {run['gpus']} GPUs / {run['nodes']} node(s)"
    )
    table = Table(title=title, header_style="bold", pad_edge=False)
    table.add_column("layer", justify="right")
    shown = [c for c in _COLUMNS if c[1] in frame.columns]
    for header, *_ in shown:
        table.add_column(f"{header}\nbefore → after", justify="right", no_wrap=True)
    table.add_column("speed-up", justify="right")
    for row in frame.to_dict("records"):
        cells = [f"{_fmt(fmt, row[b])} → {_fmt(fmt, row[a])}" for _, b, a, fmt in shown]
        table.add_row(str(row["layer"]), *cells, _fmt("{:.2f}×", row["speedup"]))
    console.print(table)
    console.print(
        f"All MoE layers: balancedness {run['balancedness_before']:.3f} → {run['balancedness_after']:.3f} "
        f"(layer-summed mean / max per GPU); slowest-GPU load summed over layers {run['speedup']:.2f}× lower."
    )
