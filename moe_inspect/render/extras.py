"""What the CLI adds to a command when asked: each expert's top tokens, and the HTML report's page.

Imported by the commands inside their functions (it pulls pandas and the library), so `--help` stays instant.
The page is written by the command through ``cli.common.save`` and ``render.html.write_html``: atomically,
honouring the umask, with the same fallback as every other output file.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pandas as pd
from rich.console import Console

from moe_inspect.analysis.balance import BalanceReport
from moe_inspect.analysis.model_info import ModelInfo
from moe_inspect.model.routers import RouterSpec
from moe_inspect.render.html import balance_html, info_html, route_html
from moe_inspect.render.tokens import render_expert_tokens


def balance_tables(report: BalanceReport) -> dict[str, Any]:
    """The tables of a --json run: those of every run, and expert_tokens when token ids were counted."""
    tables: dict[str, Any] = {
        "run": report.run, "layers": report.layers, "experts": report.experts, "coactivation": report.coactivation
    }
    if report.expert_tokens is not None:
        tables["expert_tokens"] = report.expert_tokens
    return tables


def render_balance_extras(report: BalanceReport, out: Console) -> None:
    """After the balance tables: each expert's top tokens (with top_tokens)."""
    if report.expert_tokens is not None:
        render_expert_tokens(report.expert_tokens, out)


def balance_page(report: BalanceReport) -> str:
    """The page over every token: the ``all`` block of a per-file or per-modality run."""
    from moe_inspect.render.balance import overall

    return balance_html(overall(report.layers), overall(report.experts), report.run, report.expert_tokens)


def route_page(frame: pd.DataFrame, routers: Sequence[RouterSpec], model: str) -> str:
    experts = {spec.layer: spec.num_experts for spec in routers if spec.kind == "mlp"}
    return route_html(frame, experts, model)


def info_page(info: ModelInfo, model: str) -> str:
    return info_html(info, model)
