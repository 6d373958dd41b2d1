"""Each expert's top tokens, one line per expert, one table per MoE layer (the table people screenshot)."""

from __future__ import annotations

import pandas as pd
from rich.console import Console
from rich.table import Table
from rich.text import Text

_VISIBLE = {"\n": "\\n", "\t": "\\t", "\r": "\\r"}


def visible_token(token: str) -> str:
    """Whitespace made visible: a leading space as '␣', newlines and tabs escaped; empty as '∅'."""
    if token == "":
        return "∅"
    shown = "".join(_VISIBLE.get(ch, ch) for ch in token)
    return "␣" + shown[1:] if shown.startswith(" ") else shown


def top_token_lines(frame: pd.DataFrame) -> dict[tuple[int, str], list[tuple[int, str, str]]]:
    """{(layer, router): [(expert, frequent tokens, highest-lift tokens)]} as display strings."""
    lines: dict[tuple[int, str], list[tuple[int, str, str]]] = {}
    for (layer, router, expert), rows in frame.groupby(["layer", "router", "expert"], sort=True):
        frequent = rows[rows.listed.isin(["frequent", "both"])].sort_values("count", ascending=False, kind="stable")
        lifted = rows[rows.listed.isin(["lift", "both"])].sort_values("lift", ascending=False, kind="stable")
        lines.setdefault((int(layer), str(router)), []).append(
            (
                int(expert),
                "  ".join(
                    f"{visible_token(t)} {s:.0%}"
                    for t, s in zip(frequent.token, frequent.share_of_expert, strict=True)
                ),
                "  ".join(f"{visible_token(t)} ×{x:.1f}" for t, x in zip(lifted.token, lifted.lift, strict=True)),
            )
        )
    return lines


def render_expert_tokens(frame: pd.DataFrame, console: Console) -> None:
    """Per layer: expert, its most frequent tokens (share of the expert), its highest-lift tokens."""
    for (layer, router), rows in top_token_lines(frame).items():
        suffix = " (attention router)" if router == "attention" else ""
        table = Table(title=f"Layer {layer}{suffix}: top tokens per expert", title_justify="left", header_style="bold")
        table.add_column("expert", justify="right")
        table.add_column("most frequent (share of expert)", no_wrap=True, overflow="ellipsis")
        table.add_column("highest lift (× corpus rate)", no_wrap=True, overflow="ellipsis")
        for expert, frequent, lifted in rows:
            table.add_row(str(expert), Text(frequent), Text(lifted, style="cyan"))
        console.print(table)
