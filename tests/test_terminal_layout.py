"""The terminal layout the README promises, checked on rendered text at fixed widths: the route table split
into chunks of layers, summary columns dropped by width (least important first), 256 experts wrapped."""

from __future__ import annotations

import itertools
import re

import numpy as np
import pandas as pd
from rich.console import Console

from moe_inspect.render.balance import heatmap, summary_table
from moe_inspect.render.route import render_route

HEADERS = ["layer", "tokens", "E/k", "load H", "eff.E", "rtr H", "top1 p", "max/mean", "CV", "dead", "aux", "rep1"]
DROPS = ["drop@1", "drop@1.25", "drop@2"]
# README order of importance: what stays longest when the terminal is narrow
PRIORITY = {"layer": 0, "load H": 0, "dead": 0, "rtr H": 1, "max/mean": 1, "aux": 2, **dict.fromkeys(DROPS, 2),
            "E/k": 3, "eff.E": 4, "tokens": 5, "rep1": 5, "top1 p": 6, "CV": 7}


def _header_cells(text: str, first: str) -> list[list[str]]:
    """The header rows (those starting with ``first``) of every table in ``text``, split into cells."""
    rows = [[c.strip() for c in line.split("┃") if c.strip()] for line in text.splitlines() if "┃" in line]
    return [row for row in rows if row and row[0] == first]


def _text(renderable, width: int) -> str:
    console = Console(width=width, record=True, color_system=None, force_terminal=False)
    console.print(renderable)
    return console.export_text()


def _route_frame(layers: int, tokens: int = 3, k: int = 2) -> pd.DataFrame:
    rows = []
    for position in range(tokens):
        for layer in range(layers):
            for rank in range(k):
                rows.append({
                    "position": position, "token_id": 10 + position, "token": f" t{position}", "layer": layer,
                    "rank": rank, "expert": (position + layer + rank) % 8, "weight": 0.75 if rank == 0 else 0.25,
                    "probability": 0.5, "router_entropy": 0.9, "router": "mlp", "phase": "prefill",
                    "expert_type": "routed", "token_bytes": "",
                })
    return pd.DataFrame(rows)


def _render_route(frame: pd.DataFrame, width: int) -> str:
    console = Console(width=width, record=True, color_system=None)
    render_route(frame, console)
    return console.export_text()


def test_route_layers_split_into_chunks_that_fit() -> None:
    frame = _route_frame(12)
    narrow = _render_route(frame, 80)
    assert re.findall(r"layers? \d+(?:-\d+)?", narrow) == ["layers 0-3", "layers 4-7", "layers 8-11"]
    assert max(len(line) for line in narrow.splitlines()) <= 80
    assert [h[2:] for h in _header_cells(narrow, "pos")] == [
        ["L0", "L1", "L2", "L3"], ["L4", "L5", "L6", "L7"], ["L8", "L9", "L10", "L11"]
    ]
    wide = _render_route(frame, 200)
    assert re.findall(r"layers? \d+(?:-\d+)?", wide) == ["layers 0-11"]
    assert max(len(line) for line in wide.splitlines()) <= 200
    # a cell: expert then combine weight, first choice on top (token 0 at layer 0: experts 0 then 1)
    token0 = [line for line in wide.splitlines() if "·t0" in line]
    assert len(token0) == 1 and re.search(r"·t0\s+│\s+0 \.75\s+│\s+1 \.75", token0[0]), token0
    assert "3 tokens × 12 MoE routers" in wide


def test_route_single_layer_title_and_three_experts_per_token() -> None:
    frame = _route_frame(1, k=3)
    text = _render_route(frame, 80)
    assert "layer 0" in text and "layers" not in text.split("top-3")[1]
    assert "top-3" in text


def _layers(count: int) -> pd.DataFrame:
    return pd.DataFrame({
        "layer": range(count), "router": "mlp", "tokens": 123_456, "experts": 64, "top_k": 6, "load_entropy": 0.987,
        "effective_experts": 61.2, "router_entropy": 0.812, "top1_prob": 0.31, "max_over_mean": 1.93, "cv": 0.41,
        "dead_experts": [0, 2] * (count // 2), "aux_loss": 1.013, "repeat_first": 0.22,
        "drop_rate_cf1": 0.081, "drop_rate_cf1.25": 0.032, "drop_rate_cf2": 0.001,
    })


def _summary_headers(width: int) -> list[str]:
    text = _text(summary_table(_layers(4), [1.0, 1.25, 2.0], width), width)
    assert max(len(line) for line in text.splitlines()) <= width, width
    (header,) = _header_cells(text, "layer")
    return header


def test_summary_columns_dropped_by_width_least_important_first() -> None:
    assert _summary_headers(200) == HEADERS + DROPS
    seen = []
    for width in (120, 100, 80, 60, 40, 30):
        shown = _summary_headers(width)
        seen.append(len(shown))
        kept = max(PRIORITY[h] for h in shown)
        # everything more important than the least important column still shown is shown
        assert {h for h in PRIORITY if PRIORITY[h] < kept} <= set(shown), (width, shown)
    assert seen == sorted(seen, reverse=True) and seen[0] < 15 and seen[-1] >= 3
    assert _summary_headers(30) == ["layer", "load H", "dead"]


def test_256_experts_wrap_to_the_width() -> None:
    rng = np.random.default_rng(0)
    share = rng.dirichlet(np.ones(256))
    share[[3, 100, 255]] = 0  # dead experts: a dot, not a block
    experts = pd.DataFrame({"layer": 5, "expert": np.arange(256), "share": share, "router": "mlp"})
    for width in (80, 120):
        lines = _text(heatmap(experts, width), width).splitlines()
        rows = [line for line in lines if re.search(r"[█·]{4}", line) and "legend" not in line]
        assert all(len(line) <= width for line in lines), width
        cells = "".join(re.sub(r"[^█·]", "", row.rsplit(" ", 1)[0]) for row in rows)
        assert len(cells) == 256 and cells.count("·") == 3
        assert [i for i, c in enumerate(cells) if c == "·"] == [3, 100, 255]
        ranges = [tuple(map(int, row.rsplit(" ", 1)[1].split("-"))) for row in rows]
        assert ranges[0][0] == 0 and ranges[-1][1] == 255
        assert all(b[0] == a[1] + 1 for a, b in itertools.pairwise(ranges))  # contiguous, no gaps
        assert len(rows) >= 3  # 256 cells do not fit one line of 80 or 120 columns
        assert rows[0].lstrip().startswith("L5") and not any(r.lstrip().startswith("L5") for r in rows[1:])
