"""The compare report (issue 15's tables): per-layer agreement and JS, the two load heatmaps and their ratio."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from moe_inspect.render.html.charts import HEATMAP_CSS, HEATMAP_SCRIPT, heatmap, line_chart
from moe_inspect.render.html.page import diverging_css, document, esc, kv_table, table

_AGREEMENT = ("first_choice_agreement", "topk_overlap", "topk_jaccard", "exact_set_agreement", "weight_overlap")
_DIVERGENCE = ("routing_js", "load_tv", "load_js")


def _summary_rows(summary: Mapping[str, Any] | pd.DataFrame | None) -> list[list[Any]]:
    if summary is None:
        return []
    if isinstance(summary, pd.DataFrame):
        if {"metric", "value"} <= set(summary.columns):
            return [[m, v] for m, v in zip(summary.metric, summary.value, strict=True)]
        if len(summary) == 1:
            return [[c, summary[c].iloc[0]] for c in summary.columns]
        return [list(r) for r in summary.itertuples(index=False)]
    return [[k, v] for k, v in summary.items() if not isinstance(v, dict | list)]


def compare_html(
    layers_df: pd.DataFrame,
    experts_df: pd.DataFrame,
    summary: Mapping[str, Any] | pd.DataFrame | None = None,
    labels: tuple[str, str] = ("A", "B"),
    title: str | None = None,
) -> str:
    """One page from compare_layers.csv, compare_experts.csv and the compare summary (columns that apply)."""
    a, b = labels
    body = [f"<h1>{esc(title or f'Routing compared: {a} vs {b}')}</h1>"]
    rows = _summary_rows(summary)
    if rows:
        body.append(kv_table([(str(r[0]), r[1]) for r in rows], caption="Summary"))
    x = layers_df["layer"].tolist()
    charts = []
    agreement = {c.replace("_", " "): layers_df[c] for c in _AGREEMENT if c in layers_df}
    if agreement:
        charts.append(line_chart(x, agreement, "Agreement per layer (1 = identical)", y_range=(0.0, 1.0)))
    divergence = {c.replace("_", " "): layers_df[c] for c in _DIVERGENCE if c in layers_df}
    if divergence:
        charts.append(line_chart(x, divergence, "Divergence per layer (0 = identical)"))
    if "first_choice_agreement" in layers_df and len(layers_df):
        worst = layers_df.loc[layers_df.first_choice_agreement.idxmin()]
        body.append(
            f"<p><strong>Lowest first-choice agreement: layer {int(worst.layer)} "
            f"({worst.first_choice_agreement:.1%}).</strong></p>"
        )
    body.append('<h2>Per layer</h2><div class="charts">' + "".join(charts) + "</div>")
    body.append(table(list(layers_df.columns), layers_df.itertuples(index=False), caption="compare_layers.csv"))
    if len(experts_df):
        experts = experts_df.copy()
        experts["E"] = experts.groupby("layer")["expert"].transform("count")
        uniform = 1.0 / experts["E"].to_numpy()
        body.append('<div class="charts"><section>')
        body.append(f"<h2>Load per expert (share × E): {esc(a)}</h2>")
        body.append(heatmap(experts, "share_a", uniform, f"{a}: share times E", "heatmap-a",
                            dead=experts.get("count_a", experts.share_a * 0) == 0 if "count_a" in experts else None))
        body.append(f"</section><section><h2>Load per expert (share × E): {esc(b)}</h2>")
        body.append(heatmap(experts, "share_b", uniform, f"{b}: share times E", "heatmap-b",
                            dead=experts["count_b"] == 0 if "count_b" in experts else None))
        ratio = np.exp2(experts["log2_ratio"].to_numpy(dtype=float)) if "log2_ratio" in experts else (
            experts.share_b / experts.share_a.replace(0, np.nan)
        ).to_numpy()
        experts["ratio"] = ratio
        body.append(f"</section><section><h2>Difference: {esc(b)} / {esc(a)}</h2>")
        body.append(heatmap(experts, "ratio", 1.0, f"share ratio {b} over {a}", "heatmap-diff", unit=f"× {a}"))
        body.append("</section></div>")
        moved = experts.reindex(experts["share_diff"].abs().sort_values(ascending=False).index).head(20) \
            if "share_diff" in experts else experts.head(0)
        cols = [c for c in ("layer", "expert", "count_a", "count_b", "share_a", "share_b", "share_diff", "log2_ratio")
                if c in moved]
        if len(moved):
            body.append(table(cols, moved[cols].itertuples(index=False), caption="Experts that moved most"))
    css = HEATMAP_CSS + diverging_css() + ".charts section{max-width:100%}.charts .legend{max-width:420px}"
    return document(title or "moe-inspect compare", "".join(body), css=css, script=HEATMAP_SCRIPT)
