"""Ablation report in the terminal: settings against the baseline with coloured deltas, importance extremes."""

from __future__ import annotations

import math

import pandas as pd
from rich.console import Console
from rich.table import Table
from rich.text import Text

from moe_inspect.analysis.ablate import AblationReport

#: How many experts per layer are listed as most and least important.
EXTREMES = 3


def _delta(value: float, fmt: str) -> Text:
    """Red when the change costs loss, green when it helps, dim when it is (numerically) nothing."""
    if value != value:
        return Text("-", style="dim")
    if abs(value) < 1e-9:
        return Text(fmt.format(value), style="dim")
    return Text(("+" if value > 0 else "") + fmt.format(value), style="red" if value > 0 else "green")


def settings_table(ablation: pd.DataFrame) -> Table:
    table = Table(title="Loss under each routing change (same batches as the baseline)", title_justify="left")
    table.add_column("setting", no_wrap=True)
    for name in ("layers", "loss", "ppl", "Δ loss", "Δ %", "drop rate"):
        table.add_column(name, justify="left" if name == "layers" else "right")
    for row in ablation.to_dict(orient="records"):
        baseline = row["setting"] == "baseline"
        table.add_row(
            Text(row["setting"], style="bold" if baseline else ""),
            row["layers"] or "-",
            f"{row['loss']:.4f}",
            f"{row['perplexity']:.2f}" if math.isfinite(row["perplexity"]) else "inf",
            Text("-", style="dim") if baseline else _delta(row["delta_loss"], "{:.4f}"),
            Text("-", style="dim") if baseline else _delta(100 * row["rel_delta"], "{:.2f}"),
            f"{row['drop_rate']:.2%}" if row["drop_rate"] else "-",
        )
    return table


def importance_table(importance: pd.DataFrame, spearman: pd.DataFrame | None) -> Table:
    table = Table(
        title=f"Expert importance: loss increase when removed alone ({EXTREMES} most / least per layer)",
        title_justify="left",
    )
    for name in ("layer", "most important (expert:Δ loss)", "least important", "ρ freq", "ρ weight", "ρ saliency"):
        table.add_column(name, justify="right" if name.startswith("ρ") or name == "layer" else "left")
    rho = {int(r["layer"]): r for r in spearman.to_dict(orient="records")} if spearman is not None else {}
    for layer, part in importance.groupby("layer", sort=True):
        ranked = part.sort_values("rank")
        top = ", ".join(f"{int(r.expert)}:{r.delta_loss:+.3f}" for r in ranked.head(EXTREMES).itertuples())
        bottom = ", ".join(f"{int(r.expert)}:{r.delta_loss:+.3f}" for r in ranked.tail(EXTREMES).itertuples())
        corr = rho.get(int(layer), {})
        table.add_row(
            str(layer),
            top,
            bottom,
            *(f"{corr.get(p, math.nan):.2f}" for p in ("frequency", "mean_weight", "output_norm_saliency")),
        )
    return table


def gradients_table(gradients: pd.DataFrame) -> Table:
    table = Table(title="Per-expert gradient norm of the loss (largest / smallest per layer)", title_justify="left")
    for name in ("layer", "largest (expert:norm)", "smallest"):
        table.add_column(name, justify="right" if name == "layer" else "left")
    for layer, part in gradients.groupby("layer", sort=True):
        ranked = part.sort_values("grad_norm", ascending=False)
        table.add_row(
            str(layer),
            ", ".join(f"{int(r.expert)}:{r.grad_norm:.3g}" for r in ranked.head(EXTREMES).itertuples()),
            ", ".join(f"{int(r.expert)}:{r.grad_norm:.3g}" for r in ranked.tail(EXTREMES).itertuples()),
        )
    return table


def render_ablation(report: AblationReport, console: Console) -> None:
    run = report.run
    console.print(
        f"{run.get('model')}: {run.get('predicted_tokens', 0):,} predicted tokens in {run.get('batches', 0)} batches"
    )
    console.print(settings_table(report.ablation))
    if not report.layers.empty:
        drops = report.layers.pivot(index="setting", columns="layer", values="drop_rate")
        table = Table(title="Drop rate applied per MoE layer", title_justify="left")
        table.add_column("setting")
        for layer in drops.columns:
            table.add_column(f"L{layer}", justify="right")
        for setting, row in drops.iterrows():
            table.add_row(str(setting), *(f"{v:.2%}" for v in row))
        console.print(table)
    if report.importance is not None:
        console.print(importance_table(report.importance, report.spearman))
    if report.gradients is not None:
        console.print(gradients_table(report.gradients))
