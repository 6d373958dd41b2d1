"""The route report: the text coloured by first-choice expert at a chosen layer, a card per token, a grid.

Without JavaScript the text shows the first MoE layer's colours and the token x layer grid shows every
layer; the script only switches the layer and fills the card from the inline data.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

from moe_inspect.render.html.page import document, esc, expert_css, json_data
from moe_inspect.render.tokens import visible_token

_CSS = """
.text{white-space:pre-wrap;font:15px/1.9 ui-monospace,"DejaVu Sans Mono",monospace;border:1px solid #ccc;padding:8px;
max-height:60vh;overflow:auto}
.t{border-radius:2px;padding:1px 0;cursor:default;box-shadow:inset -1px 0 #fff}
.t.decode{text-decoration:underline dotted}
.t.media{outline:1px dashed #808;outline-offset:-1px}
#card{position:sticky;top:0;background:#fff;border:1px solid #333;padding:6px 10px;margin:8px 0;min-height:3em;
font-size:13px}
#card table{border-collapse:collapse}#card td,#card th{padding:0 8px;text-align:right}
table.grid{border-collapse:collapse;font:11px ui-monospace,monospace}
table.grid td{text-align:center;min-width:22px;border:1px solid #fff;padding:0 2px}
table.grid th{font-weight:normal;text-align:right;padding:0 4px;white-space:pre}
table.grid thead th{text-align:center}
.controls{display:flex;gap:12px;align-items:center;margin:8px 0}
"""

_SCRIPT = """
(function(){
var D=JSON.parse(document.getElementById('data').textContent);
var sel=document.getElementById('layer'),card=document.getElementById('card'),spans=document.querySelectorAll('.t');
function cls(e,l){return e>=D.experts[l]?'xn':'x'+e;}
function f(v){return v===null?'–':Number(v).toPrecision(3);}
function paint(){var l=sel.selectedIndex;
 for(var i=0;i<spans.length;i++){var s=spans[i],p=+s.dataset.i,e=D.first[l][p];
  s.className='t '+cls(e,l)+(D.decode[p]?' decode':'')+(D.media[p]?' media':'');s.dataset.expert=e;}
 document.getElementById('shown').textContent=D.layers[l];}
function show(ev){var s=ev.target.closest('.t');if(!s)return;var p=+s.dataset.i,l=sel.selectedIndex;
 var rows='';for(var r=0;r<D.k;r++){var e=D.topk[l][p][r];if(e===null)continue;
  rows+='<tr><td>'+r+'</td><td><span class="sw '+cls(e,l)+'"></span> '+e+'</td><td>'+f(D.weight[l][p][r])+
  '</td><td>'+f(D.prob[l][p][r])+'</td></tr>';}
 card.innerHTML='';var h=document.createElement('div');
 h.textContent='token '+p+' '+JSON.stringify(D.tokens[p])+' · layer '+D.layers[l]+' · router entropy '+
  f(D.entropy[l][p]);card.appendChild(h);
 var t=document.createElement('table');t.innerHTML='<tr><th>rank</th><th>expert</th><th>weight</th>'+
  '<th>probability</th></tr>'+rows;card.appendChild(t);}
sel.addEventListener('change',paint);
document.querySelector('.text').addEventListener('mouseover',show);
document.querySelector('.text').addEventListener('focusin',show);
paint();
})();
"""


def _layer_arrays(frame: pd.DataFrame, n: int, k: int) -> dict[str, np.ndarray]:
    """[n, k] expert / weight / probability (NaN where a token has fewer rows) and [n] entropy of one layer."""
    experts = np.full((n, k), -1, dtype=np.int64)
    weight = np.full((n, k), np.nan)
    prob = np.full((n, k), np.nan)
    pos, rank = frame.position.to_numpy(), frame["rank"].to_numpy()
    experts[pos, rank] = frame.expert.to_numpy()
    weight[pos, rank] = frame.weight.to_numpy()
    prob[pos, rank] = frame.probability.to_numpy()
    entropy = np.full(n, np.nan)
    entropy[pos] = frame.router_entropy.to_numpy()
    return {"experts": experts, "weight": weight, "prob": prob, "entropy": entropy}


def _nullable(a: np.ndarray) -> list:
    """Arrays to JSON lists with NaN / -1 as null."""
    if a.dtype.kind == "f":
        return np.where(np.isfinite(a), np.round(a, 5), None).tolist()
    return np.where(a >= 0, a, None).tolist()


def route_html(
    frame: pd.DataFrame, num_experts: Mapping[int, int] | None = None, model: str = "", layer: int | None = None
) -> str:
    """One page for a ``route`` table (schema ``schemas.ROUTE``); ``num_experts`` maps layer -> routed E."""
    if "router" in frame and (frame.router == "mlp").any():
        frame = frame[frame.router == "mlp"]
    layers = sorted(int(v) for v in frame.layer.unique())
    if not layers:
        raise ValueError("the route table has no rows")
    tokens_frame = frame.drop_duplicates("position").sort_values("position")
    n = int(tokens_frame.position.max()) + 1
    tokens = [""] * n
    decode = [False] * n
    for p, t, ph in zip(tokens_frame.position, tokens_frame.token, tokens_frame.phase, strict=True):
        tokens[int(p)], decode[int(p)] = str(t), ph == "decode"
    media = [False] * n  # image (video, audio) placeholder positions, outlined
    if "modality" in tokens_frame:
        for p, m in zip(tokens_frame.position, tokens_frame.modality, strict=True):
            media[int(p)] = m != "text"
    k = int(frame["rank"].max()) + 1
    per_layer = {layer_: _layer_arrays(rows, n, k) for layer_, rows in frame.groupby("layer")}
    routed = frame[frame.expert_type == "routed"] if "expert_type" in frame else frame
    e_of = {
        layer_: int((num_experts or {}).get(layer_) or (routed[routed.layer == layer_].expert.max() + 1))
        for layer_ in layers
    }
    palette_size = max(e_of.values())
    shown = layer if layer in per_layer else layers[0]
    li = layers.index(shown)
    first = {layer_: per_layer[layer_]["experts"][:, 0] for layer_ in layers}

    def klass(layer_: int, e: int) -> str:
        return "xn" if e >= e_of[layer_] or e < 0 else f"x{e}"

    spans = "".join(
        f'<span class="t {klass(shown, int(first[shown][p]))}{" decode" if decode[p] else ""}'
        f'{" media" if media[p] else ""}" tabindex="0" '
        f'data-i="{p}" data-expert="{int(first[shown][p])}">{esc(tokens[p])}</span>'
        for p in range(n)
    )
    options = "".join(f'<option value="{x}"{" selected" if x == shown else ""}>{x}</option>' for x in layers)
    head = "".join(f'<th scope="col">{x}</th>' for x in layers)
    grid_rows = "".join(
        f'<tr><th scope="row">{p} {esc(visible_token(tokens[p]))}</th>'
        + "".join(f'<td class="{klass(x, int(first[x][p]))}">{int(first[x][p])}</td>' for x in layers)
        + "</tr>"
        for p in range(n)
    )
    data = {
        "layers": layers,
        "tokens": tokens,
        "decode": decode,
        "media": media,
        "k": k,
        "experts": [e_of[x] for x in layers],
        "first": [first[x] for x in layers],
        "topk": [_nullable(per_layer[x]["experts"]) for x in layers],
        "weight": [_nullable(per_layer[x]["weight"]) for x in layers],
        "prob": [_nullable(per_layer[x]["prob"]) for x in layers],
        "entropy": [_nullable(per_layer[x]["entropy"]) for x in layers],
    }
    swatches = "".join(
        f'<li><span class="sw {klass(shown, e)}"></span>expert {e}</li>' for e in range(min(palette_size, 64))
    )
    body = (
        f"<h1>Routing of {n} tokens</h1>"
        f'<p class="meta">model <code>{esc(model)}</code> · {len(layers)} MoE layers · top-{k} · '
        "each token coloured by its first-choice expert"
        f"{' · image/video/audio tokens outlined (dashed)' if any(media) else ''}</p>"
        f'<div class="controls"><label for="layer">Layer</label><select id="layer">{options}</select>'
        f'<span>showing layer <strong id="shown">{shown}</strong></span></div>'
        f'<ul class="legend" aria-label="expert colours">{swatches}</ul>'
        f'<div id="card" aria-live="polite">Hover or focus (Tab) a token for its {k} experts, weights, '
        "probabilities and entropy.</div>"
        f'<div class="text" data-layer-index="{li}">{spans}</div>'
        '<h2>First-choice expert per token and layer</h2>'
        f'<div class="scroll"><table class="grid" id="grid"><thead><tr><th>token</th>{head}</tr></thead>'
        f"<tbody>{grid_rows}</tbody></table></div>"
        f"{json_data(data)}"
    )
    return document(f"moe-inspect route: {model}", body, css=_CSS + expert_css(palette_size), script=_SCRIPT)
