"""The balance report: load heatmap, per-layer lines, the per-layer table and each expert's top tokens."""

from __future__ import annotations

import pandas as pd

from moe_inspect.render.balance import two_stacks
from moe_inspect.render.html.charts import HEATMAP_CSS, HEATMAP_SCRIPT, heatmap, line_chart
from moe_inspect.render.html.page import Raw, diverging_css, document, esc, table
from moe_inspect.render.tokens import top_token_lines

_TABLE_COLUMNS = (
    ("layer", "layer"), ("tokens", "tokens"), ("experts", "E"), ("top_k", "k"), ("load_entropy", "load entropy"),
    ("effective_experts", "effective E"), ("router_entropy", "router entropy"), ("top1_prob", "top-1 prob"),
    ("max_over_mean", "max/mean"), ("cv", "CV"), ("dead_experts", "dead"), ("aux_loss", "aux loss"),
    ("vocab_specialization", "vocab spec."), ("vocab_specialization_random", "vocab spec. random"),
    ("drop_rate", "dropped (measured)"),
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


def _charts(frame: pd.DataFrame, stack: str | None) -> list[str]:
    """The per-layer line charts of one stack (titles name it when the model has two)."""
    x = frame["layer"].tolist()
    suffix = f" ({stack})" if stack else ""
    charts = [
        line_chart(x, {"load entropy": frame.load_entropy, "router entropy": frame.router_entropy},
                   "Entropy (normalised, 1 = uniform)" + suffix, y_range=(0.0, 1.0)),
        line_chart(x, {"max / mean": frame.max_over_mean}, "Busiest expert / mean" + suffix, reference=1.0),
    ]
    drops = _drop_columns(frame)
    if drops:
        charts.append(
            line_chart(x, {f"capacity factor {c[len('drop_rate_cf'):]}": frame[c] for c in drops},
                       "Dropped assignments at capacity" + suffix,
                       y_range=(0.0, max(float(frame[drops].max().max()), 0.01)))
        )
    if "vocab_specialization" in frame:
        charts.append(
            line_chart(x, {"vocab specialisation": frame.vocab_specialization,
                           "random baseline": frame.vocab_specialization_random},
                       "Vocabulary specialisation" + suffix, y_range=(0.0, 1.0))
        )
    if "drop_rate" in frame and frame["drop_rate"].notna().any():
        charts.append(
            line_chart(x, {"dropped by the router": frame.drop_rate},
                       "Measured drop rate (the model's capacity)" + suffix,
                       y_range=(0.0, max(float(frame.drop_rate.max()), 0.01)))
        )
    return charts


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
    both = two_stacks(mlp_layers)
    keys = ["stack", "layer"] if "stack" in mlp_layers and "stack" in mlp_experts else ["layer"]
    per_layer_e = mlp_experts.merge(mlp_layers[[*keys, "experts"]], on=keys, how="left")
    if both:  # rows named 'enc 1', 'dec 1': the heatmap groups rows by this label
        labels = zip(per_layer_e["stack"], per_layer_e["layer"], strict=True)
        per_layer_e["layer"] = [f"{stack[:3]} {layer}" for stack, layer in labels]
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
    stacks = list(dict.fromkeys(mlp_layers["stack"])) if both else [None]
    charts = [
        chart
        for stack in stacks
        for chart in _charts(mlp_layers if stack is None else mlp_layers[mlp_layers["stack"] == stack], stack)
    ]
    body.append('<h2>Per layer</h2><div class="charts">' + "".join(charts) + "</div>")
    measured = "drop_rate" in layers and layers["drop_rate"].notna().any()
    drops = _drop_columns(layers)
    cols = [(c, h) for c, h in _TABLE_COLUMNS if c in layers and (c != "drop_rate" or measured)]
    cols += [(c, f"drop @{c[12:]}") for c in drops]
    rows = []
    for record in layers.to_dict("records"):
        row: list = []
        for c, _ in cols:
            value = record[c]
            if c == "dead_experts" and value:
                value = Raw(f"<strong>{int(value)} dead</strong>")
            elif c == "layer" and record.get("router") == "attention":
                value = f"{value} (attention)"
            elif c == "layer" and both:
                value = f"{record['stack']} {value}"
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
