"""The info report: architecture, the routing rule, parameter breakdown and weight memory."""

from __future__ import annotations

from moe_inspect.analysis.model_info import ModelInfo
from moe_inspect.render.html.page import document, esc, kv_table, table
from moe_inspect.units import human_bytes, human_count


def _share(part: int, total: int) -> str:
    return f"{100 * part / total:.1f}%" if total else "–"


def info_html(info: ModelInfo, model: str | None = None) -> str:
    from moe_inspect.render.info import _experts_line, _layers_line, _shared_line

    total = info.total_params
    head = kv_table(
        [
            ("Model type", f"{info.model_type} ({info.model_class})"),
            ("Layers", _layers_line(info)),
            ("Routed experts", _experts_line(info)),
            ("Shared experts", _shared_line(info)),
        ]
    )
    params = table(
        ["parameters", "count", "exact", "of total"],
        [
            ["Total", human_count(total), total, "100%"],
            ["Routed experts", human_count(info.routed_expert_params), info.routed_expert_params,
             _share(info.routed_expert_params, total)],
            ["Active per token (all weights)", human_count(info.active_params), info.active_params,
             _share(info.active_params, total)],
            ["Active, excl. input embedding", human_count(info.active_params_excl_input_embedding),
             info.active_params_excl_input_embedding, _share(info.active_params_excl_input_embedding, total)],
            ["Active, non-embedding", human_count(info.active_params_non_embedding),
             info.active_params_non_embedding, _share(info.active_params_non_embedding, total)],
            ["Embedding" + (" = LM head (tied)" if info.tied_embeddings else ""),
             human_count(info.input_embedding_params), info.input_embedding_params,
             _share(info.input_embedding_params, total)],
            ["LM head", human_count(info.lm_head_params), info.lm_head_params, _share(info.lm_head_params, total)],
            ["Activation ratio", f"{100 * info.activation_ratio:.2f}%", "", ""],
        ],
        caption="Parameters",
    )
    memory = table(
        ["dtype", "all weights", "active per token"],
        [[dtype, human_bytes(s["all"]), human_bytes(s["active"])] for dtype, s in info.memory.items()],
        caption="Weight memory (GiB = 2^30 bytes; weights only)",
    )
    layers = table(
        ["layer", "kind", "experts", "top-k", "shared", "routed-expert params"],
        [[x.layer, x.kind, x.experts, x.top_k, x.shared_experts, x.routed_expert_params] for x in info.layers],
        caption="Per layer",
    )
    notes = "".join(f'<p class="note">Note: {esc(n)}</p>' for n in info.notes)
    body = (
        f"<h1>{esc(model or info.model_type)}: {'MoE' if info.moe_layers else 'dense'}</h1>{head}"
        f"<h2>Routing rule</h2><p>{esc(info.routing_rule)}</p>"
        f"<h2>Size</h2>{params}{memory}{notes}<details><summary>Per layer</summary>{layers}</details>"
    )
    return document(f"moe-inspect info: {model or info.model_type}", body)
