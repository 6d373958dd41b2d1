"""Balance report in the terminal: a per-layer summary and a layers-by-experts load heatmap.

The heatmap colours each expert by its share relative to uniform (share * E) on a log2 scale, one
character per expert, wrapping long rows so 256 experts stay readable in 80 columns.
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from moe_inspect.analysis.balance import BalanceReport
from moe_inspect.analysis.tables import drop_column
from moe_inspect.errors import UserError
from moe_inspect.io.export import atomic_path
from moe_inspect.io.schemas import router_label
from moe_inspect.render.modality import render_modalities

# log2(share * E) buckets from cold to hot; the middle one is "about uniform". Each bucket has a colour for
# 256-colour/true-colour terminals, a distinct one of the 16 standard colours (hex colours collapse there, two
# buckets sharing one), and a glyph for output without colour (a pipe, a file), where colour carries nothing.
_SCALE = (
    (-math.inf, -2.0, "#2c7bb6", "blue", "_", "< 1/4×"),
    (-2.0, -1.0, "#6baed6", "bright_blue", "-", "1/4–1/2×"),
    (-1.0, -0.415, "#c6dbef", "cyan", ":", "1/2–3/4×"),
    (-0.415, 0.415, "#f0f0f0", "white", "=", "≈ uniform"),
    (0.415, 1.0, "#fdae61", "yellow", "+", "1.3–2×"),
    (1.0, 2.0, "#f46d43", "bright_red", "*", "2–4×"),
    (2.0, math.inf, "#a50026", "red", "#", "> 4×"),
)


def _bucket(ratio: float) -> int:
    value = math.log2(ratio)
    return next((i for i, (low, high, *_) in enumerate(_SCALE) if low <= value < high), len(_SCALE) - 1)


def _swatch(bucket: int, color_system: str | None) -> tuple[str, str]:
    """(character, style) of a bucket's cell for a terminal with this colour system."""
    _, _, rich_colour, standard, glyph, _ = _SCALE[bucket]
    if color_system is None:
        return glyph, ""
    return "█", standard if color_system == "standard" else rich_colour


_TITLE_POINTS = 10

# (header, column, format, priority): lower priority columns go first when the terminal is narrow.
_SUMMARY_COLUMNS = (
    ("layer", "layer", "{}", 0),
    ("tokens", "tokens", "{:,}", 5),
    ("E/k", None, "", 3),
    ("load H", "load_entropy", "{:.3f}", 0),
    ("eff.E", "effective_experts", "{:.1f}", 4),
    ("rtr H", "router_entropy", "{:.3f}", 1),
    ("top1 p", "top1_prob", "{:.3f}", 6),
    ("max/mean", "max_over_mean", "{:.2f}", 1),
    ("CV", "cv", "{:.2f}", 7),
    ("dead", "dead_experts", "{}", 0),
    ("aux", "aux_loss", "{:.3f}", 2),
    ("rep1", "repeat_first", "{:.2f}", 5),
)


def two_stacks(frame: pd.DataFrame) -> bool:
    """Whether a per-router table holds an encoder-decoder's routers (then labels name the stack)."""
    return "stack" in frame and bool((frame["stack"] == "encoder").any())


def stack_label(layer: int, router: str, stack: str, both: bool) -> str:
    """'12' (or '12a'), or 'enc 1' / 'dec 1' when the table holds both stacks of an encoder-decoder."""
    return f"{stack[:3]} {router_label(layer, router)}" if both else router_label(layer, router)


def _cell(row: dict, key: str | None, fmt: str, both: bool = False) -> Text:
    if key is None:
        return Text(f"{row['experts']}/{row['top_k']}" if "top_k" in row else f"{row['experts']}")
    value = row[key]
    if key == "layer":
        return Text(stack_label(value, row["router"], row.get("stack", "decoder"), both))
    if isinstance(value, float) and math.isnan(value):
        return Text("–", style="dim")
    return Text(fmt.format(value), style="bold red" if key == "dead_experts" and value > 0 else "")


def summary_table(layers: pd.DataFrame, capacity_factors: list[float], width: int = 200) -> Table:
    """One row per MoE router with the figures people look at first, fitted to ``width``.

    Columns absent from ``layers`` (engine records lack probabilities, for instance) are left out.
    """
    columns = list(_SUMMARY_COLUMNS) + [(f"drop@{cf:g}", drop_column(cf), "{:.1%}", 2) for cf in capacity_factors]
    if "drop_rate" in layers and layers["drop_rate"].notna().any():  # routers that drop over capacity themselves
        columns.insert(len(_SUMMARY_COLUMNS), ("dropped", "drop_rate", "{:.1%}", 1))
    columns = [c for c in columns if c[1] is None or c[1] in layers.columns]
    if "repeat_first" not in layers.columns and "repeat_any" in layers.columns:
        columns.append(("rep∩", "repeat_any", "{:.2f}", 5))
    records = layers.to_dict("records")
    both = two_stacks(layers)
    cells = {c[0]: [_cell(r, c[1], c[2], both) for r in records] for c in columns}

    def needed(cols: list) -> int:
        return sum(max([len(c[0])] + [len(t.plain) for t in cells[c[0]]]) + 3 for c in cols) + 1

    while needed(columns) > width and any(c[3] > 0 for c in columns):
        columns.remove(max(columns, key=lambda c: (c[3], columns.index(c))))
    table = Table(title="Per-layer routing summary", header_style="bold", pad_edge=False)
    for header, *_ in columns:
        table.add_column(header, justify="right", no_wrap=True)
    for i in range(len(records)):
        table.add_row(*[cells[c[0]][i] for c in columns])
    return table


def heatmap(experts: pd.DataFrame, width: int, color_system: str | None = "truecolor") -> Group:
    """Layers × experts; one coloured cell per expert (a glyph without colour), rows wrapped to ``width``."""
    label_width = 6
    # groups of 8 cells plus a space; room for a " 192-255" range label when a row wraps
    per_line = max(8, min(128, (width - label_width - 10) // 9 * 8))
    lines: list[Text] = [Text("Expert load relative to uniform (share × E), one cell per expert", style="bold")]
    both = two_stacks(experts)
    stacks = experts["stack"] if "stack" in experts else pd.Series("decoder", index=experts.index)
    for (stack, layer, router), group in experts.groupby([stacks, "layer", "router"], sort=False):
        shares = group.sort_values("expert")["share"].to_numpy()
        ratios = shares * len(shares)
        label = stack_label(layer, router, stack, both) if both else f"L{router_label(layer, router)}"
        for start in range(0, len(ratios), per_line):
            line = Text(f"{label if start == 0 else '':>{label_width - 1}} ")
            for i, ratio in enumerate(ratios[start : start + per_line]):
                if i and i % 8 == 0:
                    line.append(" ")
                line.append(*(("·", "dim") if ratio == 0 else _swatch(_bucket(float(ratio)), color_system)))
            if len(ratios) > per_line:
                line.append(f" {start}-{min(start + per_line, len(ratios)) - 1}", style="dim")
            lines.append(line)
    legend = Text("legend: ")
    for bucket, (*_, name) in enumerate(_SCALE):
        legend.append(*_swatch(bucket, color_system))
        legend.append(f" {name}  ")
    legend.append("· dead", style="dim")
    lines.append(legend)
    return Group(*lines)


def overall(frame: pd.DataFrame) -> pd.DataFrame:
    """The ``all`` block of a ``--by-file`` (``source``) or image (``modality``) table (the table itself otherwise)."""
    column = next((c for c in ("source", "modality") if c in frame), None)
    if column is None:
        return frame
    return frame[frame[column] == "all"].drop(columns=column).reset_index(drop=True)


def render_balance(report: BalanceReport, console: Console) -> None:
    """Summary table, heatmap and one line on what was measured (over all files with ``--by-file``)."""
    run = report.run
    console.print(summary_table(overall(report.layers), run["capacity_factors"], console.width))
    console.print(heatmap(overall(report.experts), console.width, console.color_system))
    if "modality" in report.layers:
        render_modalities(report, console, heatmap)
    if run.get("source") == "engine record":
        console.print(_record_footer(run))
        return
    note = " (partial: interrupted)" if run.get("partial") else ""
    shape = f"{run['seq_len']} ({run['mode']})" if run.get("seq_len") else "images"
    console.print(
        f"[dim]{run['tokens']:,} tokens in {run['batches']} batches of up to {run['batch_size']} × "
        f"{shape}, {run['elapsed_s']:.1f} s, {run['tokens_per_s'] or 0:,.0f} tokens/s"
        f"{note}[/dim]"
    )


def _record_footer(run: dict) -> str:
    """What an engine record held: format, files, tokens or assignments, dense layers."""
    amount = f"{run['tokens']:,} tokens" if run.get("tokens") is not None else f"{run['assignments']:,} assignments"
    unit = run.get("batch_unit") or "batch"
    batches = f" in {run['batches']:,} × {unit}" if run.get("batches") else ""
    dense = run.get("dense_layers") or []
    dense_note = f"; dense layers (no router): {_ranges(dense)}" if dense else ""
    return f"[dim]{run['format']}: {amount}{batches} from {len(run['records'])} file(s){dense_note}[/dim]"


def _ranges(values: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    parts: list[str] = []
    start = prev = values[0]
    for v in [*values[1:], None]:
        if v is not None and v == prev + 1:
            prev = v
            continue
        parts.append(f"{start}-{prev}" if prev > start else f"{start}")
        if v is not None:
            start = prev = v
    return ", ".join(parts)


PLOT_FORMATS = ("png", "pdf", "svg")


def plot_format(path: str | Path) -> str:
    """The image format a plot path's extension names; other extensions are refused (no PNG in a .txt)."""
    suffix = Path(path).suffix.lower().lstrip(".")
    if suffix not in PLOT_FORMATS:
        raise UserError(
            f"Plot {path} has {'no extension' if not suffix else f'the extension .{suffix}'}; "
            f"name a {', '.join('.' + f for f in PLOT_FORMATS)} file."
        )
    return suffix


def heatmap_figure(experts: pd.DataFrame, title: str = "") -> Any:
    """The heatmap as a matplotlib Figure; the title is wrapped to the figure's width, never cut off."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import TwoSlopeNorm

    both = two_stacks(experts)
    stacks = experts["stack"] if "stack" in experts else pd.Series("decoder", index=experts.index)
    keys = list(dict.fromkeys(zip(stacks, experts["layer"], experts["router"], strict=True)))
    width = int(experts["expert"].max()) + 1
    grid = np.full((len(keys), width), np.nan)
    for row, (stack, layer, router) in enumerate(keys):
        group = experts[(stacks == stack) & (experts["layer"] == layer) & (experts["router"] == router)]
        ratio = group["share"].to_numpy() * len(group)
        grid[row, group["expert"].to_numpy()] = np.log2(np.clip(ratio, 1 / 64, None))
    fig_width = min(4 + width * 0.08, 24)
    title = title or "expert load relative to uniform (log2 share × E)"
    # about 0.6 em per character; model ids are paths without spaces, so long words are broken too
    lines = textwrap.wrap(title, width=max(20, int(fig_width * 72 / (0.6 * _TITLE_POINTS))), break_long_words=True)
    fig, ax = plt.subplots(figsize=(fig_width, 1.5 + len(keys) * 0.25 + 0.2 * len(lines)), layout="constrained")
    image = ax.imshow(grid, aspect="auto", cmap="RdBu_r", norm=TwoSlopeNorm(vcenter=0, vmin=-3, vmax=3))
    ax.set_yticks(range(len(keys)), [stack_label(layer, router, stack, both) for stack, layer, router in keys])
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    fig.suptitle("\n".join(lines), fontsize=_TITLE_POINTS)
    fig.colorbar(image, ax=ax, label="log2(share × E)")
    return fig


def write_heatmap_png(experts: pd.DataFrame, path: str | Path, title: str = "") -> Path:
    """The same heatmap as PNG, PDF or SVG by the path's extension (matplotlib, the `plot` extra), atomically."""
    fmt = plot_format(path)
    import matplotlib.pyplot as plt

    fig = heatmap_figure(experts, title)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=120, format=fmt)
    finally:
        plt.close(fig)
    return Path(path)
