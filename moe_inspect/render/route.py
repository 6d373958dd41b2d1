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
RUN_SHOWN = (2, 1)
"""Of a run of identical image (video, audio) placeholders longer than ``sum + 1``, the first and last rows shown."""


def shown_rows(tokens: pd.DataFrame) -> list[tuple[str, object]]:
    """('row', token row) in order, with each long run of one repeated non-text placeholder cut to its first and
    last rows around one ('gap', (count, modality)) entry: a 256-token image would otherwise fill the screen."""
    rows = list(tokens.itertuples(index=False))
    modality = [getattr(r, "modality", "text") for r in rows]
    out: list[tuple[str, object]] = []
    i = 0
    while i < len(rows):
        j = i
        while modality[i] != "text" and j + 1 < len(rows) and rows[j + 1].token_id == rows[i].token_id:
            j += 1
        head, tail = RUN_SHOWN
        if j - i + 1 > head + tail + 1:
            out += [("row", r) for r in rows[i : i + head]]
            out.append(("gap", (j - i + 1 - head - tail, modality[i])))
            out += [("row", r) for r in rows[j - tail + 1 : j + 1]]
        else:
            out += [("row", r) for r in rows[i : j + 1]]
        i = j + 1
    return out


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
    columns = ["position", "token_id", "token", "token_bytes", "phase"]
    tokens = frame.drop_duplicates("position")[columns + (["modality"] if "modality" in frame else [])]
    generated = bool((tokens["phase"] == "decode").any())  # a phase column only when there is a decode phase
    mixed = "modality" in tokens and bool((tokens["modality"] != "text").any())  # a modality column for images
    rows = shown_rows(tokens)
    tables = []
    for start in range(0, len(labels), per_table):
        chunk = labels[start : start + per_table]
        chunk_layers = sorted({layer for layer, _ in chunk})
        title = f"layer{'s' if len(chunk_layers) > 1 else ''} {layer_ranges(chunk_layers)}"
        table = Table(title=title, header_style="bold", show_lines=separate_tokens, pad_edge=False)
        table.add_column("pos", justify="right", style="dim")
        if generated:
            table.add_column("phase", style="dim")
        if mixed:
            table.add_column("modality")
        table.add_column("token", max_width=_TOKEN_WIDTH, no_wrap=True)
        for layer, router in chunk:
            table.add_column(f"L{router_label(layer, router)}", justify="right")
        for kind, row in rows:
            if kind == "gap":
                count, modality = row  # type: ignore[misc]
                gap = Text(f"… {count} more", style="dim magenta")
                table.add_row("…", *([Text("")] if generated else []), Text(modality, style="magenta"), gap)
                continue
            style = "italic green" if row.phase == "decode" else ("magenta" if mixed and row.modality != "text" else "")
            table.add_row(
                str(row.position),
                *([Text(row.phase)] if generated else []),
                *([Text(row.modality, style="magenta" if row.modality != "text" else "dim")] if mixed else []),
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
    if "modality" in frame and (frame["modality"] != "text").any():
        counts = frame.drop_duplicates("position")["modality"].value_counts()
        parts = [f"{int(counts[m])} {m}" for m in counts.index if m != "text"]
        console.print(
            f"{', '.join(parts)} token(s) (magenta) routed with {int(counts.get('text', 0))} text tokens; runs of one "
            "repeated placeholder are cut here, never in --csv."
        )
    for table in route_tables(frame, console.width):
        console.print(table)
    _generated(frame, console)


def _generated(frame: pd.DataFrame, console: Console) -> None:
    generated = frame.attrs.get("generated_text")
    if generated:
        console.print(Text("generated: ", style="bold") + Text(escape_controls(generated), style="italic green"))
