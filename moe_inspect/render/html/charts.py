"""Charts as plain markup: a layers x experts heatmap table and small SVG line charts (no script needed)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import pandas as pd

from moe_inspect.render.html.page import (
    DIVERGING,
    DIVERGING_LABELS,
    OKABE_ITO,
    esc,
    legend,
    sequential,
)
from moe_inspect.render.html.page import diverging_bin as _bin

HEATMAP_CSS = """
table.heat{border-collapse:collapse;font-size:10px;font-variant-numeric:tabular-nums}
table.heat td{width:var(--cw,14px);min-width:var(--cw,14px);height:18px;
padding:0;border:1px solid #fff;text-align:center;color:#fff}
table.heat th{font-weight:normal;padding:0 4px;text-align:right;white-space:nowrap}
table.heat thead th{text-align:center;font-size:9px;padding:0}
"""

_DASH = ("", "6 3", "2 2", "8 3 2 3", "1 3", "10 4")

# Chart text is 11px (page.py: ``svg text``). No font is measured at render time, so a label's width is
# estimated from above: 0.65 em covers digits, lower case and punctuation (digits are 0.64 em in DejaVu Sans,
# less in most UI fonts), 0.8 em capitals, 1 em the widest letters.
_FONT_PX = 11
_MAX_LABEL_CHARS = 12  # longer y-axis labels are cut with an ellipsis and told in full in a tooltip


def _label_width(text: str) -> float:
    ems = sum(1.0 if c in "mwMW@%…" else 0.8 if c.isupper() else 0.65 for c in text)
    return ems * _FONT_PX


def _shown(text: str) -> str:
    return text if len(text) <= _MAX_LABEL_CHARS else text[: _MAX_LABEL_CHARS - 1] + "…"


def _y_label(x: float, y: float, text: str) -> str:
    """A y-axis tick label, right-aligned at ``x``; cut past ``_MAX_LABEL_CHARS`` with the full text as title."""
    shown = _shown(text)
    tip = f"<title>{esc(text)}</title>" if shown != text else ""
    return f'<text class="ytick" x="{x:.1f}" y="{y:.1f}" text-anchor="end">{tip}{esc(shown)}</text>'


def heatmap(
    frame: pd.DataFrame,
    value: str,
    reference: pd.Series | float,
    label: str,
    table_id: str,
    dead: pd.Series | None = None,
    unit: str = "× uniform",
) -> str:
    """One row per layer, one cell per expert, coloured by ``value / reference`` on the diverging scale.

    ``frame`` has ``layer``, ``expert`` and ``value`` columns; ``reference`` is per row (aligned) or a number.
    The cell's title gives the exact figure; dead experts (``dead`` true) are dark and marked '×'.
    """
    ratio = frame[value].to_numpy(dtype=float) / np.asarray(reference, dtype=float)
    dead_mask = np.zeros(len(frame), bool) if dead is None else dead.to_numpy(bool)
    experts = int(frame["expert"].max()) + 1 if len(frame) else 0
    unit = unit if unit.startswith(" ") else " " + unit
    width = 30 if experts <= 16 else 14 if experts <= 64 else 5 if experts <= 160 else 4
    head = ""
    if experts <= 64:
        head = "<thead><tr><th>layer</th>" + "".join(f"<th>{e}</th>" for e in range(experts)) + "</tr></thead>"
    rows = []
    layers = frame["layer"].to_numpy()
    start = 0
    for layer in pd.unique(layers):
        end = start
        while end < len(frame) and layers[end] == layer:
            end += 1
        cells = []
        for i in range(start, end):
            # Terse on purpose (61 x 256 cells): the value as title; the script adds layer and expert on hover.
            if dead_mask[i]:
                cells.append("<td class=hd title=dead>×</td>")
            elif math.isfinite(ratio[i]) and ratio[i] > 0:
                cells.append(f"<td class=h{_bin(ratio[i])} title={ratio[i]:.3g}></td>")
            else:
                cells.append(f"<td class=h4 title={ratio[i]:.3g}></td>")
        rows.append(f'<tr data-layer="{layer}"><th scope="row">{layer}</th>{"".join(cells)}</tr>')
        start = end
    items = [*zip(DIVERGING, DIVERGING_LABELS, strict=True)]
    if dead is not None:
        items.append(("#1a1a1a", "dead (×)"))
    return (
        f"{legend(items, label)}"
        f'<div class="scroll"><table class="heat" id="{esc(table_id)}" style="--cw:{width}px" '
        f'data-unit="{esc(unit)}" aria-label="{esc(label)}">{head}<tbody>{"".join(rows)}</tbody></table></div>'
    )


# Spells out a heatmap cell's title (layer, expert, unit) on hover; the bare value is there without script.
HEATMAP_SCRIPT = """
document.querySelectorAll('table.heat[data-unit]').forEach(function(t){
 t.addEventListener('mouseover',function(ev){var c=ev.target.closest('td');if(!c||c.dataset.done)return;
  var r=c.parentNode,e=[].indexOf.call(r.querySelectorAll('td'),c);
  c.title='layer '+r.dataset.layer+' expert '+e+': '+(c.title==='dead'?'dead (never chosen)':c.title+t.dataset.unit);
  c.dataset.done=1;});});
"""


def sequential_heatmap(frame: pd.DataFrame, value: str, label: str, table_id: str) -> str:
    """Layers x experts coloured by ``value`` on viridis, scaled to the largest absolute value per table."""
    values = frame[value].to_numpy(dtype=float)
    top = float(np.nanmax(np.abs(values))) if len(values) and np.isfinite(values).any() else 1.0
    rows: dict[int, list[str]] = {}
    for layer, expert, v in zip(frame["layer"], frame["expert"], values, strict=True):
        colour = sequential(max(v, 0.0) / top) if math.isfinite(v) and top > 0 else "#ffffff"
        rows.setdefault(int(layer), []).append(
            f'<td style="background:{colour}" title="layer {layer} expert {expert}: {v:.4g}"></td>'
        )
    body = "".join(
        f'<tr data-layer="{layer}"><th scope="row">{layer}</th>{"".join(c)}</tr>' for layer, c in rows.items()
    )
    experts = max((len(c) for c in rows.values()), default=0)
    width = 30 if experts <= 16 else 14 if experts <= 64 else 5 if experts <= 160 else 4
    head = ""
    if experts <= 64:
        head = "<thead><tr><th>layer</th>" + "".join(f"<th>{e}</th>" for e in range(experts)) + "</tr></thead>"
    scale = legend([(sequential(t), f"{t * top:.3g}") for t in (0.0, 0.25, 0.5, 0.75, 1.0)], label)
    return (
        f'{scale}<div class="scroll"><table class="heat" id="{esc(table_id)}" style="--cw:{width}px">'
        f"{head}<tbody>{body}</tbody></table></div>"
    )


def line_chart(
    x: Sequence[float],
    series: Mapping[str, Sequence[float]],
    title: str,
    y_range: tuple[float, float] | None = None,
    reference: float | None = None,
    width: int = 420,
    height: int = 200,
    y_format: Callable[[float], str] = "{:.3g}".format,
) -> str:
    """An SVG line chart: one line per series, told apart by colour (Okabe-Ito) and dash pattern (print).

    The left margin is sized from the longest y-axis label (``y_format`` of the range's ends), so no label is
    clipped by the edge of the svg however long it is (labels past 12 characters are cut, with a tooltip).
    """
    right, top, bottom = 10, 22, 28
    xs = [float(v) for v in x]
    ys = [float(v) for values in series.values() for v in values if v is not None and math.isfinite(float(v))]
    if not xs or not ys:
        return ""
    lo, hi = y_range if y_range else (min(ys + ([reference] if reference is not None else [])), max(ys))
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    hi_text, lo_text = y_format(hi), y_format(lo)
    widest = max(_label_width(_shown(t)) for t in (hi_text, lo_text))
    left = max(44, math.ceil(widest) + 8)  # 4 px gap to the axis, 4 px to the edge

    def px(v: float) -> float:
        return left + (v - x0) / (x1 - x0) * (width - left - right)

    def py(v: float) -> float:
        return height - bottom - (v - lo) / (hi - lo) * (height - top - bottom)

    parts = [
        f'<svg role="img" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
        f'aria-label="{esc(title)}" xmlns="http://www.w3.org/2000/svg">',
        f'<text x="{left}" y="14" font-weight="600">{esc(title)}</text>',
        f'<line x1="{left}" y1="{py(lo):.1f}" x2="{width - right}" y2="{py(lo):.1f}" stroke="#888"/>',
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{height - bottom}" stroke="#888"/>',
        _y_label(left - 4, py(hi) + 4, hi_text),
        _y_label(left - 4, py(lo) + 4, lo_text),
        f'<text x="{left}" y="{height - 10}">layer {xs[0]:g}</text>',
        f'<text x="{width - right}" y="{height - 10}" text-anchor="end">layer {xs[-1]:g}</text>',
    ]
    if reference is not None and lo <= reference <= hi:
        parts.append(
            f'<line x1="{left}" y1="{py(reference):.1f}" x2="{width - right}" y2="{py(reference):.1f}" '
            'stroke="#555" stroke-dasharray="1 3"/>'
        )
    keys = []
    for i, (name, values) in enumerate(series.items()):
        colour, dash = OKABE_ITO[[4, 5, 2, 0, 6, 1][i % 6]], _DASH[i % len(_DASH)]
        points = " ".join(
            f"{px(a):.1f},{py(float(b)):.1f}"
            for a, b in zip(xs, values, strict=True)
            if b is not None and math.isfinite(float(b))
        )
        dash_attr = f' stroke-dasharray="{dash}"' if dash else ""
        parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2"{dash_attr} points="{points}"/>')
        keys.append(
            f'<li><svg width="24" height="10" aria-hidden="true"><line x1="0" y1="5" x2="24" y2="5" stroke="{colour}" '
            f'stroke-width="2"{dash_attr}/></svg>{esc(name)}</li>'
        )
    parts.append("</svg>")
    return f'<figure>{"".join(parts)}<figcaption><ul class="legend">{"".join(keys)}</ul></figcaption></figure>'
