"""The ablate report (issue 16's tables): loss delta per routing change, importance per expert."""

from __future__ import annotations

import math

import pandas as pd

from moe_inspect.render.html.charts import HEATMAP_CSS, sequential_heatmap
from moe_inspect.render.html.page import OKABE_ITO, document, esc, table


def _bars(settings: pd.DataFrame) -> str:
    """Horizontal bars of delta_loss per setting (orange = worse than baseline, blue = better), values printed."""
    rows = settings[settings.setting != "baseline"]
    if not len(rows):
        return ""
    deltas = rows.delta_loss.astype(float)
    top = max(float(deltas.abs().max()), 1e-12)
    label_w, bar_w, row_h = 220, 360, 22
    height = row_h * len(rows) + 10
    zero = label_w + bar_w / 2
    parts = [f'<svg role="img" width="{label_w + bar_w + 90}" height="{height}" aria-label="loss change per setting">']
    for i, (name, d) in enumerate(zip(rows.setting, deltas, strict=True)):
        y = 5 + i * row_h
        length = 0.0 if math.isnan(d) else abs(d) / top * bar_w / 2
        x = zero if d >= 0 else zero - length
        colour = OKABE_ITO[5] if d > 0 else OKABE_ITO[4]
        parts.append(f'<text x="{label_w - 6}" y="{y + 14}" text-anchor="end">{esc(name)}</text>')
        parts.append(f'<rect x="{x:.1f}" y="{y + 3}" width="{length:.1f}" height="{row_h - 8}" fill="{colour}"/>')
        parts.append(f'<text x="{label_w + bar_w + 4}" y="{y + 14}">{d:+.4f}</text>')
    parts.append(f'<line x1="{zero}" y1="0" x2="{zero}" y2="{height}" stroke="#333"/></svg>')
    caption = "<figcaption>Loss change against the baseline (nats per token)</figcaption>"
    return "<figure>" + "".join(parts) + caption + "</figure>"


def ablate_html(ablation_df: pd.DataFrame, importance_df: pd.DataFrame | None = None, title: str | None = None) -> str:
    """One page from ablation.csv and, when measured, importance.csv."""
    body = [f"<h1>{esc(title or 'What the routing is worth')}</h1>"]
    base = ablation_df[ablation_df.setting == "baseline"]
    if len(base):
        b = base.iloc[0]
        body.append(
            f'<p class="meta">baseline loss {b.loss:.4f} (perplexity {b.perplexity:.3f}) '
            f"over {int(b.tokens):,} tokens</p>"
        )
    body.append("<h2>Settings</h2>" + _bars(ablation_df))
    body.append(table(list(ablation_df.columns), ablation_df.itertuples(index=False), caption="ablation.csv"))
    if importance_df is not None and len(importance_df):
        body.append("<h2>Expert importance (loss increase when removed alone)</h2>")
        body.append(sequential_heatmap(importance_df, "delta_loss", "loss increase per expert", "importance"))
        ranked = importance_df.sort_values(["layer", "rank"])
        parts = []
        for layer, rows in ranked.groupby("layer"):
            top = rows.head(3)
            bottom = rows.tail(3).iloc[::-1]  # least important first
            parts.append([layer, ", ".join(f"{e} ({d:+.4f})" for e, d in zip(top.expert, top.delta_loss, strict=True)),
                          ", ".join(f"{e} ({d:+.4f})" for e, d in zip(bottom.expert, bottom.delta_loss, strict=True))])
        body.append(table(["layer", "most important", "least important"], parts, caption="Per layer"))
        body.append(table(list(importance_df.columns), ranked.itertuples(index=False), caption="importance.csv"))
    return document(title or "moe-inspect ablate", "".join(body), css=HEATMAP_CSS)
