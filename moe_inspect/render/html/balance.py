"""The balance report: load heatmap, per-layer lines, the per-layer table and each expert's top tokens."""

from __future__ import annotations

import pandas as pd

from moe_inspect.render.html.charts import HEATMAP_CSS, HEATMAP_SCRIPT, heatmap, line_chart
from moe_inspect.render.html.page import Raw, diverging_css, document, esc, table
from moe_inspect.render.tokens import top_token_lines

_TABLE_COLUMNS = (
    ("layer", "layer"), ("tokens", "tokens"), ("experts", "E"), ("top_k", "k"), ("load_entropy", "load entropy"),
    ("effective_experts", "effective E"), ("router_entropy", "router entropy"), ("top1_prob", "top-1 prob"),
    ("max_over_mean", "max/mean"), ("cv", "CV"), ("dead_experts", "dead"), ("aux_loss", "aux loss"),
    ("vocab_specialization", "vocab spec."), ("vocab_specialization_random", "vocab spec. random"),
)


def _drop_columns(layers: pd.DataFrame) -> list[str]:
    return [c for c in layers.columns if c.startswith("drop_rate_cf")]


def _meta(run: dict) -> str:
    parts = [f"model <code>{esc(run.get('model', '?'))}</code>"]
    if run.get("tokens") is not None:
        parts.append(f"{run['tokens']:,} tokens")
    corpus = [c.get("path") or c.get("name") for c in run.get("corpus", []) if isinstance(c, dict)]
    if corpus:
        parts.append("corpus " + ", ".join(f"<code>{esc(c)}</code>" for c in corpus if c))
    if run.get("partial"):
        parts.append("<strong>partial (interrupted)</strong>")
    return '<p class="meta">' + " · ".join(parts) + "</p>"


def balance_html(
    layers: pd.DataFrame,
    experts: pd.DataFrame,
    run: dict | None = None,
    expert_tokens: pd.DataFrame | None = None,
    title: str | None = None,
) -> str:
    """The whole balance report as one page (frames of ``schemas.LAYERS`` / ``EXPERTS`` / ``EXPERT_TOKENS``)."""
    run = run or {}
    mlp_layers = layers[layers.router == "mlp"] if "router" in layers else layers
    mlp_experts = experts[experts.router == "mlp"] if "router" in experts else experts
    per_layer_e = mlp_experts.merge(mlp_layers[["layer", "experts"]], on="layer", how="left")
    body = [f"<h1>{esc(title or 'Expert load')}</h1>", _meta(run)]
    body.append("<h2>Load per expert (share × E; 1 = uniform)</h2>")
    body.append(
        heatmap(
            per_layer_e, "share", 1.0 / per_layer_e["experts"].to_numpy(), "share times E, per layer and expert",
            "heatmap", dead=per_layer_e["count"] == 0,
        )
    )
    body.append(
        '<p class="note">Rows are MoE layers, columns experts. Purple: fewer tokens than uniform; orange: more. '
        "Hover a cell for its exact value.</p>"
    )
    x = mlp_layers["layer"].tolist()
    charts = [
        line_chart(x, {"load entropy": mlp_layers.load_entropy, "router entropy": mlp_layers.router_entropy},
                   "Entropy (normalised, 1 = uniform)", y_range=(0.0, 1.0)),
        line_chart(x, {"max / mean": mlp_layers.max_over_mean}, "Busiest expert / mean", reference=1.0),
    ]
    drops = _drop_columns(mlp_layers)
    if drops:
        charts.append(
            line_chart(x, {f"capacity factor {c[len('drop_rate_cf'):]}": mlp_layers[c] for c in drops},
                       "Dropped assignments at capacity",
                       y_range=(0.0, max(float(mlp_layers[drops].max().max()), 0.01)))
        )
    if "vocab_specialization" in mlp_layers:
        charts.append(
            line_chart(x, {"vocab specialisation": mlp_layers.vocab_specialization,
                           "random baseline": mlp_layers.vocab_specialization_random},
                       "Vocabulary specialisation", y_range=(0.0, 1.0))
        )
    body.append('<h2>Per layer</h2><div class="charts">' + "".join(charts) + "</div>")
    cols = [(c, h) for c, h in _TABLE_COLUMNS if c in layers] + [(c, f"drop @{c[12:]}") for c in drops]
    rows = []
    for record in layers.to_dict("records"):
        row: list = []
        for c, _ in cols:
            value = record[c]
            if c == "dead_experts" and value:
                value = Raw(f"<strong>{int(value)} dead</strong>")
            elif c == "layer" and record.get("router") == "attention":
                value = f"{value} (attention)"
            row.append(value)
        rows.append(row)
    body.append(table([h for _, h in cols], rows, caption="Per-layer figures (layers.csv)"))
    if expert_tokens is not None and len(expert_tokens):
        body.append("<h2>Top tokens per expert</h2>")
        body.append(
            '<p class="note">Most frequent: share of the expert\'s assignments. Highest lift: how many times more '
            "often than the token's corpus rate. ␣ is a leading space.</p>"
        )
        for (layer, router), lines in top_token_lines(expert_tokens).items():
            suffix = " (attention router)" if router == "attention" else ""
            body.append(
                f'<details{" open" if len(lines) <= 16 else ""}><summary>Layer {layer}{suffix}</summary>'
                + table(["expert", "most frequent", "highest lift"], [[e, f, lift] for e, f, lift in lines],
                        cls="num tokens")
                + "</details>"
            )
    css = HEATMAP_CSS + diverging_css() + "table.tokens td{text-align:left;font-family:ui-monospace,monospace}"
    return document(title or "moe-inspect balance", "".join(body), css=css, script=HEATMAP_SCRIPT)
