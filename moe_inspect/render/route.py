"""The token-by-layer routing table, split into chunks of layers that fit the terminal."""

from __future__ import annotations

import unicodedata

import pandas as pd
from rich.console import Console
from rich.table import Table
from rich.text import Text

from moe_inspect.io.schemas import router_label
from moe_inspect.io.tokens import byte_label, label_bytes
from moe_inspect.units import layer_ranges

# Distinct, readable colours; an expert keeps its colour in every cell so patterns stand out.
PALETTE = (
    "bright_cyan", "bright_magenta", "bright_yellow", "bright_green", "bright_red", "bright_blue",
    "cyan", "magenta", "yellow", "green", "red", "blue", "white", "orange3", "orchid", "turquoise2",
)
_CELL_WIDTH = 8
_TOKEN_WIDTH = 14


def escape_controls(text: str) -> str:
    """Control characters and NUL as visible escapes (\\x1b, \\x00): raw, they recolour or misalign the table."""
    return "".join(
        f"\\x{ord(ch):02x}" if unicodedata.category(ch) == "Cc" and ch not in "\n\t" else ch for ch in text
    )


def visible_token(token: str) -> str:
    """Make whitespace and control characters visible so ' add' and 'add' read differently."""
    return escape_controls(token).replace(" ", "·").replace("\n", "⏎").replace("\t", "⇥") or "∅"


def _cell(group: pd.DataFrame) -> Text:
    text = Text()
    for i, row in enumerate(group.itertuples(index=False)):
        if i:
            text.append("\n")
        if row.expert_type != "routed":
            text.append(f"{'drop' if row.expert_type == 'dropped' else row.expert_type:>4}", style="dim")
        else:
            text.append(f"{row.expert:>4}", style=PALETTE[row.expert % len(PALETTE)])
        text.append(f" {row.weight:.2f}".replace("0.", ".", 1), style="dim")
    return text


def route_tables(frame: pd.DataFrame, width: int) -> list[Table]:
    """One rich Table per chunk of routers, each as wide as ``width`` allows."""
    separate_tokens = int(frame["rank"].max()) >= 2  # with k >= 3, rules between tokens keep rows apart
    labels = list(dict.fromkeys(zip(frame["layer"], frame["router"], strict=True)))
    per_table = max(1, (width - _TOKEN_WIDTH - 12) // (_CELL_WIDTH + 3))
    cells = {key: _cell(group) for key, group in frame.groupby(["position", "layer", "router"], sort=False)}
    tokens = frame.drop_duplicates("position")[["position", "token", "token_bytes", "phase"]]
    generated = bool((tokens["phase"] == "decode").any())  # a phase column only when there is a decode phase
    tables = []
    for start in range(0, len(labels), per_table):
        chunk = labels[start : start + per_table]
        chunk_layers = sorted({layer for layer, _ in chunk})
        title = f"layer{'s' if len(chunk_layers) > 1 else ''} {layer_ranges(chunk_layers)}"
        table = Table(title=title, header_style="bold", show_lines=separate_tokens, pad_edge=False)
        table.add_column("pos", justify="right", style="dim")
        if generated:
            table.add_column("phase", style="dim")
        table.add_column("token", max_width=_TOKEN_WIDTH, no_wrap=True)
        for layer, router in chunk:
            table.add_column(f"L{router_label(layer, router)}", justify="right")
        for row in tokens.itertuples(index=False):
            style = "italic green" if row.phase == "decode" else ""
            table.add_row(
                str(row.position),
                *([Text(row.phase)] if generated else []),
                Text(byte_label(label_bytes(row.token_bytes)) or visible_token(row.token), style=style),
                *[cells.get((row.position, layer, router), Text("")) for layer, router in chunk],
            )
        tables.append(table)
    return tables


def render_route(frame: pd.DataFrame, console: Console) -> None:
    """Print the routing table: each cell lists the token's experts (rank order) and combine weights."""
    if frame.empty:
        console.print("No routing rows to show (no router matched the selected layers).")
        return
    stacks = list(dict.fromkeys(frame["stack"])) if "stack" in frame else []
    if len(stacks) > 1:  # encoder-decoder: each stack has its own positions and layers
        for stack in stacks:
            console.print(f"[bold]{stack}[/bold]")
            part = frame[frame["stack"] == stack].reset_index(drop=True)
            part.attrs = {**frame.attrs, "generated_text": ""}  # said once, after the decoder's block
            render_route(part, console)
        _generated(frame, console)
        return
    k = int(frame["rank"].max()) + 1
    console.print(
        f"[bold]{frame['position'].nunique()} tokens × {frame.groupby(['layer', 'router']).ngroups} MoE routers"
        f"[/bold], top-{k}: each cell lists expert and combine weight, first choice on top."
    )
    for table in route_tables(frame, console.width):
        console.print(table)
    _generated(frame, console)


def _generated(frame: pd.DataFrame, console: Console) -> None:
    generated = frame.attrs.get("generated_text")
    if generated:
        console.print(Text("generated: ", style="bold") + Text(escape_controls(generated), style="italic green"))
