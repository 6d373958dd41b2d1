"""What the CLI adds after its main table when asked: each expert's top tokens, and the HTML report."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd
from rich.console import Console

from moe_inspect.balance import BalanceReport
from moe_inspect.params import ModelInfo
from moe_inspect.render.html import balance_html, info_html, route_html, write_html
from moe_inspect.render.tokens import render_expert_tokens
from moe_inspect.routers import RouterSpec


def balance_extras(report: BalanceReport, out: Console, err: Console, html: Path | None) -> None:
    if report.expert_tokens is not None:
        render_expert_tokens(report.expert_tokens, out)
    if html is not None:
        page = balance_html(report.layers, report.experts, report.run, report.expert_tokens)
        write_html(page, html)
        err.print(f"Wrote {html} ({len(page.encode()) / 1024:,.0f} KiB)")


def route_extras(
    frame: pd.DataFrame, routers: Sequence[RouterSpec], model: str, err: Console, html: Path | None
) -> None:
    if html is not None:
        experts = {spec.layer: spec.num_experts for spec in routers if spec.kind == "mlp"}
        write_html(route_html(frame, experts, model), html)
        err.print(f"Wrote {html}")


def info_extras(info: ModelInfo, model: str, err: Console, html: Path | None) -> None:
    if html is not None:
        write_html(info_html(info, model), html)
        err.print(f"Wrote {html}")
