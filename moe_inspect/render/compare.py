"""Compare reports in the terminal: a per-layer table with the worst layers highlighted and a one-line verdict."""

from __future__ import annotations

import math

import pandas as pd
from rich.console import Console
from rich.table import Table
from rich.text import Text

from moe_inspect.analysis.compare import CompareReport
from moe_inspect.analysis.compare_runs import RunsComparison


def _worst(values: pd.Series, lowest: bool) -> set[int]:
    """Row positions of the worst quarter (at least one, at most three) of the layers."""
    count = min(3, max(1, len(values) // 4))
    order = values.reset_index(drop=True).sort_values(ascending=lowest, kind="stable")
    return set(order.index[:count])


def _fmt(value: float, fmt: str) -> str:
    return "–" if isinstance(value, float) and math.isnan(value) else fmt.format(value)


def layers_table(layers: pd.DataFrame) -> Table:
    """Agreement, overlap, JS and load TV per layer; the layers with the lowest first-choice agreement in red."""
    worst = _worst(layers["first_choice_agreement"], lowest=True)
    table = Table(title="Routing drift per MoE layer (model B against model A)", header_style="bold", pad_edge=False)
    for header in ("layer", "1st agree", "overlap", "same set", "w overlap", "JS bits", "load TV"):
        table.add_column(header, justify="right", no_wrap=True)
    for i, row in enumerate(layers.to_dict("records")):
        style = "bold red" if i in worst and row["first_choice_agreement"] < 1 else ""
        table.add_row(
            Text(str(row["layer"]), style=style),
            Text(_fmt(row["first_choice_agreement"], "{:.2%}"), style=style),
            _fmt(row["topk_overlap"], "{:.2%}"),
            _fmt(row["exact_set_agreement"], "{:.2%}"),
            _fmt(row["weight_overlap"], "{:.3f}"),
            _fmt(row["routing_js"], "{:.5f}"),
            _fmt(row["load_tv"], "{:.4f}"),
        )
    return table


def verdict(report: CompareReport) -> str:
    """One line naming the layer with the lowest first-choice agreement, read against the output drift."""
    s = report.summary.iloc[0]
    if not len(report.layers):
        return "No MoE router fired; nothing to compare."
    return (
        f"Layer {s['worst_layer']} drifts most: {s['worst_first_choice_agreement']:.2%} of tokens keep their "
        f"first-choice expert (mean over layers {s['first_choice_agreement']:.2%}); next-token top-1 agreement "
        f"{s['top1_agreement']:.2%}, KL(A || B) {s['output_kl']:.4f} nats."
    )


def movers(experts: pd.DataFrame, count: int = 3) -> str:
    """The experts whose load share B raised and lowered most, as 'L2 e5 +3.1 pp' items."""
    if not len(experts):
        return ""
    ordered = experts.sort_values("share_diff", kind="stable")

    def items(rows: pd.DataFrame) -> str:
        return ", ".join(f"L{r.layer} e{r.expert} {r.share_diff * 100:+.2f} pp" for r in rows.itertuples())

    gained = ordered[ordered["share_diff"] > 0].tail(count).iloc[::-1]
    lost = ordered[ordered["share_diff"] < 0].head(count)
    return f"Load share gained most: {items(gained) or 'none'}; lost most: {items(lost) or 'none'}."


def render_compare(report: CompareReport, console: Console) -> None:
    run = report.run
    console.print(layers_table(report.layers))
    s = report.summary.iloc[0]
    disk = ""
    if s["mode"] == "two-pass" and not math.isnan(s["record_bytes"]):
        size = s["record_bytes"] / 2**20
        disk = f"; model A's record took {size:,.1f} MiB ({s['record_bytes_per_token']:,.0f} B/token)"
    console.print(
        f"[dim]{int(s['tokens']):,} tokens in {run.get('batches', 0)} batches ({s['mode']}), "
        f"{run.get('elapsed_s', 0):.1f} s{disk}. Output: top-1 agreement {s['top1_agreement']:.2%} and mean "
        f"KL(A || B) {s['output_kl']:.4f} nats over {int(s['predicted_positions']):,} positions, on {s['kl_support']}."
        "[/dim]",
        soft_wrap=True,
    )
    console.print(f"[dim]{movers(report.experts)}[/dim]", soft_wrap=True)
    console.print(Text(verdict(report), style="bold"), soft_wrap=True)


def runs_table(report: RunsComparison) -> Table:
    worst = _worst(report.layers["load_tv"], lowest=False)
    a, b = report.run["labels"]
    table = Table(title=f"Expert load per MoE layer: {a} against {b}", header_style="bold", pad_edge=False)
    for header in ("layer", "load TV", "load JS (bits)", f"experts leaning {a}", f"experts leaning {b}"):
        table.add_column(header, justify="right", no_wrap=True)
    for i, row in enumerate(report.layers.to_dict("records")):
        experts = report.experts[report.experts["layer"] == row["layer"]]
        style = "bold red" if i in worst else ""
        table.add_row(
            Text(str(row["layer"]), style=style),
            Text(_fmt(row["load_tv"], "{:.3f}"), style=style),
            _fmt(row["load_js"], "{:.3f}"),
            " ".join(map(str, experts.loc[experts["specialises_in"] == a, "expert"])) or "–",
            " ".join(map(str, experts.loc[experts["specialises_in"] == b, "expert"])) or "–",
        )
    return table


def render_runs(report: RunsComparison, console: Console) -> None:
    console.print(runs_table(report))
    layers = report.layers
    if not len(layers):
        return
    top = layers.loc[layers["load_tv"].idxmax()]
    a, b = report.run["labels"]
    console.print(
        Text(
            f"Layer {int(top['layer'])} separates {a} and {b} most: total variation {top['load_tv']:.3f} between their "
            f"expert loads (mean over layers {layers['load_tv'].mean():.3f}).",
            style="bold",
        ),
        soft_wrap=True,
    )
