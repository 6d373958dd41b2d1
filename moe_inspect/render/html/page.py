"""The shell every HTML report shares: escaping, colour scales made for colour-blind readers, one page.

A report is one file: CSS, script and data inline, no URL that a browser would fetch (the tests check
the network log). The main content is server-rendered HTML, so it reads without JavaScript and prints.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Sequence
from typing import Any

# Okabe & Ito (2008), the palette designed to stay distinct under every common colour-vision deficiency.
OKABE_ITO = ("#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2", "#D55E00", "#CC79A7", "#999999")

# viridis at 16 stops (perceptually uniform, readable in greyscale and by colour-blind viewers).
_VIRIDIS = (
    "#440154", "#481a6c", "#472f7d", "#414487", "#39568c", "#31688e", "#2a788e", "#23888e",
    "#1f988b", "#22a884", "#35b779", "#54c568", "#7ad151", "#a5db36", "#d2e21b", "#fde725",
)

# ColorBrewer PuOr (9 classes), colour-blind safe and diverging: purple = under-used, orange = over-used.
DIVERGING = ("#542788", "#8073ac", "#b2abd2", "#d8daeb", "#f7f7f7", "#fee0b6", "#fdb863", "#e08214", "#b35806")
# log2(value / reference) bin edges for DIVERGING; the middle bin is "about uniform" (within ±10%).
DIVERGING_EDGES = (-2.0, -1.0, -0.5, -0.138, 0.138, 0.5, 1.0, 2.0)
DIVERGING_LABELS = ("< ¼×", "¼–½×", "½–0.7×", "0.7–0.9×", "≈ 1×", "1.1–1.4×", "1.4–2×", "2–4×", "> 4×")
DEAD = "#1a1a1a"


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _hex_rgb(colour: str) -> tuple[int, int, int]:
    return int(colour[1:3], 16), int(colour[3:5], 16), int(colour[5:7], 16)


def _lerp(a: str, b: str, t: float) -> str:
    ra, rb = _hex_rgb(a), _hex_rgb(b)
    return "#" + "".join(f"{round(x + (y - x) * t):02x}" for x, y in zip(ra, rb, strict=True))


def sequential(t: float) -> str:
    """viridis at t in [0, 1] (linear between 16 stops)."""
    t = min(max(t, 0.0), 1.0) * (len(_VIRIDIS) - 1)
    i = min(int(t), len(_VIRIDIS) - 2)
    return _lerp(_VIRIDIS[i], _VIRIDIS[i + 1], t - i)


def text_on(background: str) -> str:
    """Black or white text, whichever contrasts more with ``background`` (WCAG relative luminance)."""

    def channel(c: int) -> float:
        s = c / 255
        return s / 12.92 if s <= 0.03928 else ((s + 0.055) / 1.055) ** 2.4

    r, g, b = (channel(c) for c in _hex_rgb(background))
    luminance = 0.2126 * r + 0.7152 * g + 0.0722 * b
    return "#000" if (luminance + 0.05) / 0.05 > 1.05 / (luminance + 0.05) else "#fff"


def expert_colours(num_experts: int) -> list[str]:
    """Okabe-Ito up to 8 experts; beyond, viridis spread over the expert ids (the id is always printed too)."""
    if num_experts <= len(OKABE_ITO):
        return list(OKABE_ITO[:num_experts])
    return [sequential(i / max(num_experts - 1, 1)) for i in range(num_experts)]


def diverging_bin(ratio: float) -> int:
    """Index into DIVERGING for value/reference ``ratio`` (> 0)."""
    value = math.log2(ratio)
    return sum(value >= edge for edge in DIVERGING_EDGES)


def expert_css(num_experts: int, prefix: str = "x") -> str:
    """One class per expert id (``.x3``) with its background and a readable text colour; ``.xn`` for null."""
    rules = [f".{prefix}{i}{{background:{c};color:{text_on(c)}}}" for i, c in enumerate(expert_colours(num_experts))]
    rules.append(f".{prefix}n{{background:#fff;color:#000;outline:1px dashed #000}}")
    return "".join(rules)


def diverging_css(prefix: str = "h") -> str:
    rules = "".join(f".{prefix}{i}{{background:{c}}}" for i, c in enumerate(DIVERGING))
    return rules + f".{prefix}d{{background:{DEAD}}}"


def legend(items: Sequence[tuple[str, str]], label: str) -> str:
    """A colour legend as real text, each swatch next to its meaning."""
    swatches = "".join(
        f'<li><span class="sw" style="background:{c}"></span>{esc(text)}</li>' for c, text in items
    )
    return f'<ul class="legend" aria-label="{esc(label)}">{swatches}</ul>'


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], cls: str = "num", caption: str | None = None) -> str:
    """A plain HTML table; cells are escaped unless passed as ``Raw``."""
    head = "".join(f'<th scope="col">{esc(h)}</th>' for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    cap = f"<caption>{esc(caption)}</caption>" if caption else ""
    inner = f"{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody>"
    return f'<div class="scroll"><table class="{cls}">{inner}</table></div>'


def kv_table(rows: Sequence[tuple[str, Any]], caption: str | None = None) -> str:
    """Label / value rows (no header), labels as row headers."""
    body = "".join(f'<tr><th scope="row">{esc(k)}</th><td>{cell(v)}</td></tr>' for k, v in rows)
    cap = f"<caption>{esc(caption)}</caption>" if caption else ""
    return f'<table class="num kv">{cap}<tbody>{body}</tbody></table>'


class Raw(str):
    """Markup that ``table`` inserts as is."""


def cell(value: Any) -> str:
    if isinstance(value, Raw):
        return str(value)
    return esc(fmt(value))


def fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int) or (hasattr(value, "dtype") and getattr(value.dtype, "kind", "") in "iu"):
        return f"{int(value):,}"
    if isinstance(value, float) or hasattr(value, "dtype"):
        v = float(value)
        if math.isnan(v):
            return "–"
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:,.0f}"
    return str(value)


def json_data(data: Any, element_id: str = "data") -> str:
    """Data for the script, inline; '</' is escaped so no string can close the element."""
    text = json.dumps(data, separators=(",", ":"), allow_nan=False, default=_default)
    safe = text.replace("</", "<\\/")
    return f'<script type="application/json" id="{element_id}">{safe}</script>'


def _default(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"not JSON: {type(value)}")


_CSS = """
*{box-sizing:border-box}
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;margin:0;padding:16px 24px;
color:#111;background:#fff;max-width:1400px}
h1{font-size:20px;margin:0 0 4px}h2{font-size:16px;margin:24px 0 8px;border-bottom:1px solid #ccc}
.meta{color:#444;margin:0 0 12px}.meta code{background:#f3f3f3;padding:0 3px}
table.num{border-collapse:collapse;margin:4px 0 12px;font-variant-numeric:tabular-nums}
table.num th,table.num td{border:1px solid #ddd;padding:2px 8px;text-align:right}
table.num th{background:#f3f3f3}table.num td:first-child,table.num th:first-child{text-align:left}
table.num caption{text-align:left;font-weight:600;padding:2px 0;white-space:nowrap}
table.kv th,table.kv td{text-align:left}
.legend{list-style:none;padding:0;margin:4px 0 8px;display:flex;flex-wrap:wrap;gap:4px 14px}
.legend li{display:flex;align-items:center;gap:4px}
.sw{display:inline-block;width:14px;height:14px;border:1px solid #555}
.scroll{overflow-x:auto}
.note{color:#444;font-size:13px}
figure{margin:8px 0;max-width:440px}figcaption{font-size:13px;color:#333}
.charts{display:flex;flex-wrap:wrap;gap:12px}
svg text{font:11px system-ui,"DejaVu Sans",sans-serif;fill:#222}
:focus-visible{outline:3px solid #0072B2;outline-offset:1px}
@media print{body{padding:0}.noprint{display:none}*{-webkit-print-color-adjust:exact;print-color-adjust:exact}}
"""


def document(title: str, body: str, css: str = "", script: str = "") -> str:
    """A complete page: charset, a content security policy that forbids every fetch, styles, body, script."""
    # default-src 'none' blocks any network access a bug could add; inline style/script are allowed.
    csp = "default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; img-src data:"
    js = f"<script>{script}</script>" if script else ""
    return (
        "<!DOCTYPE html>\n"
        f'<html lang="en"><head><meta charset="utf-8"><meta http-equiv="Content-Security-Policy" content="{csp}">'
        f'<link rel="icon" href="data:,">'
        f'<meta name="viewport" content="width=device-width,initial-scale=1"><title>{esc(title)}</title>'
        f"<style>{_CSS}{css}</style></head><body>{body}"
        '<p class="note">Made by moe-inspect. Self-contained: no file or network request is made when this page '
        "opens.</p>"
        f"{js}</body></html>\n"
    )
