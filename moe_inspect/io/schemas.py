"""Every table's columns, in order, with their meaning: the one place CSV, DataFrames and README agree on.

All tables are long format (one row per observation), so ``pd.read_csv`` gives a tidy frame that
pivots and groups without reshaping.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

# The capacity factors whose drop rates the layers table holds unless others are asked for.
DEFAULT_CAPACITY_FACTORS = (1.0, 1.25, 2.0)


@dataclass(frozen=True)
class Column:
    name: str
    dtype: str
    doc: str


@dataclass(frozen=True)
class Schema:
    name: str
    doc: str
    columns: tuple[Column, ...]

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.columns]

    @property
    def dtypes(self) -> dict[str, str]:
        return {c.name: c.dtype for c in self.columns}

    def markdown(self) -> str:
        """The schema as a Markdown table, for the README."""
        rows = [f"| `{c.name}` | {c.dtype} | {c.doc} |" for c in self.columns]
        return "\n".join(["| column | type | meaning |", "|---|---|---|", *rows])


STACK = Column("stack", "string", "'encoder' or 'decoder' of an encoder-decoder ('decoder' for decoder-only models)")
"""Every per-router table carries it, so an encoder's layer 1 and a decoder's layer 1 stay apart."""

ROUTE = Schema(
    "route",
    "One row per (token, MoE router, rank): which experts each token used.",
    (
        Column("position", "int64", "token position in the sequence (prompt then generated tokens), from 0"),
        Column("token_id", "int64", "token id"),
        Column("token", "string", "the token decoded on its own"),
        Column("layer", "int64", "the model's decoder-layer index of this router (dense layers have none)"),
        Column("rank", "int64", "0 is the model's first choice, then 1 .. k-1"),
        Column("expert", "int64", "expert id; ids >= the layer's routed-expert count are zero/skip experts"),
        Column("weight", "float64", "combine weight the expert received, as the model computed it"),
        Column("probability", "float64", "routing probability of this expert under the family's own scoring"),
        Column("router_entropy", "float64", "the token's routing entropy at this router divided by log(C)"),
        Column("router", "string", "'mlp', or 'attention' for JetMoE's mixture-of-attention router"),
        Column("phase", "string", "'prefill' for prompt tokens, 'decode' for generated tokens"),
        Column(
            "expert_type", "string",
            "'routed', the null expert kind ('zero', 'skip'), or 'dropped' (over capacity: expert -1, weight 0)",
        ),
        Column("token_bytes", "string", "the token's exact bytes in hex, e.g. '<E6 9D>' (tells partial UTF-8 apart)"),
        STACK,
        Column(
            "modality", "string",
            "what the model embedded at the position: 'text', or 'image', 'video', 'audio' for a vision-language "
            "model's placeholder tokens (told apart by the config's token ids)",
        ),
    ),
)

LAYERS = Schema(
    "layers",
    "One row per MoE router: load, balance, confidence and what-if figures over the corpus.",
    (
        Column("layer", "int64", "decoder-layer index"),
        Column("router", "string", "'mlp' or 'attention' (JetMoE)"),
        Column("tokens", "int64", "real (non-pad) tokens routed"),
        Column("experts", "int64", "routed experts E"),
        Column("top_k", "int64", "experts chosen per token k"),
        Column("load_entropy", "float64", "entropy of the assignment-share vector / log E (1 = uniform)"),
        Column("effective_experts", "float64", "exp(entropy of the share vector)"),
        Column("router_entropy", "float64", "mean per-token routing entropy / log C under the family's scoring"),
        Column("top1_prob", "float64", "mean over tokens of the highest routing probability"),
        Column("cv", "float64", "coefficient of variation of expert counts (population std / mean)"),
        Column("max_over_mean", "float64", "max count / mean count (MaxVio + 1)"),
        Column("jain", "float64", "Jain's fairness index of counts, in [1/E, 1]"),
        Column("dead_experts", "int64", "experts never chosen"),
        Column("aux_loss", "float64", "transformers' load_balancing_loss_func on this layer's logits alone"),
        Column("switch_loss", "float64", "Switch Transformer loss E * sum f_e P_e (uniform = 1)"),
        Column("z_loss", "float64", "ST-MoE router z-loss: mean (logsumexp logits)^2"),
        Column("repeat_first", "float64", "share of consecutive token pairs with the same first-choice expert"),
        Column("repeat_first_random", "float64", "random baseline 1/E"),
        Column("repeat_any", "float64", "share of consecutive token pairs whose top-k sets intersect"),
        Column("repeat_any_random", "float64", "random baseline 1 - C(E-k,k)/C(E,k)"),
        Column("null_share", "float64", "share of assignments to zero/skip experts (0 for most families)"),
        STACK,
        Column(
            "drop_rate", "float64",
            "measured: share of real-token assignments the router itself dropped over capacity (Switch, NLLB-MoE; "
            "depends on batch size and padding, see run.json capacity); empty for routers that apply no capacity",
        ),
    ),
)

EXPERTS = Schema(
    "experts",
    "One row per (MoE router, expert): how much load each expert took.",
    (
        Column("layer", "int64", "decoder-layer index"),
        Column("expert", "int64", "expert id"),
        Column("count", "int64", "tokens that chose the expert at any rank"),
        Column("share", "float64", "count / (tokens * k); uniform = 1/E"),
        Column("token_share", "float64", "count / tokens; uniform = k/E"),
        Column("first_choice", "int64", "tokens whose rank-0 expert it was"),
        Column("mean_prob", "float64", "mean routing probability over all tokens"),
        Column("mean_weight", "float64", "mean combine weight over the tokens that chose it"),
        Column("router", "string", "'mlp' or 'attention' (JetMoE)"),
        STACK,
        Column(
            "drop_rate", "float64",
            "measured: share of this expert's real-token assignments the router dropped over capacity; empty for "
            "routers that apply no capacity",
        ),
    ),
)

COACTIVATION = Schema(
    "coactivation",
    "One row per (MoE router, expert pair) chosen together by at least one token; symmetric.",
    (
        Column("layer", "int64", "decoder-layer index"),
        Column("expert_a", "int64", "expert id"),
        Column("expert_b", "int64", "expert id (both orders are listed)"),
        Column("count", "int64", "tokens whose top-k contains both experts"),
        Column("share_of_a", "float64", "count / tokens that chose expert_a (OLMoE's N[a,b]/N[a])"),
        Column("router", "string", "'mlp' or 'attention' (JetMoE)"),
        STACK,
    ),
)

ROUTERS = Schema(
    "routers",
    "One row per hooked router.",
    (
        Column("router", "int64", "router index in execution order"),
        Column("layer", "int64", "decoder-layer index"),
        Column("kind", "string", "'mlp' or 'attention'"),
        Column("path", "string", "module path in the model"),
        Column("router_class", "string", "router module class"),
        Column("experts", "int64", "routed experts E"),
        Column("top_k", "int64", "experts chosen per token"),
        Column("null_experts", "int64", "zero/skip expert columns"),
        Column("shared_experts", "int64", "always-on shared experts"),
        Column("scoring", "string", "routing distribution: softmax, sigmoid (normalised), ..."),
        Column("selection", "string", "top-k, bias-corrected, hash or product-key"),
        Column("heuristic", "bool", "matched by output shape (remote code) rather than by class"),
    ),
)

ABLATION = Schema(
    "ablation",
    "One row per ablate setting, each against the unchanged model on the same batches.",
    (
        Column("setting", "string", "'baseline' for the unchanged model, else the option as typed ('top-k=1')"),
        Column("layers", "string", "MoE layers the setting changes ('all', or a comma list; '' for baseline)"),
        Column("loss", "float64", "next-token cross entropy in nats: sum over all predicted positions / their count"),
        Column("perplexity", "float64", "exp(loss)"),
        Column("delta_loss", "float64", "loss - baseline loss"),
        Column("rel_delta", "float64", "delta_loss / baseline loss"),
        Column("tokens", "int64", "predicted positions (real tokens with a real next token)"),
        Column("drop_rate", "float64", "dropped / all assignments over every MoE layer (0 unless capacity applies)"),
    ),
)

ABLATION_LAYERS = Schema(
    "ablation_layers",
    "One row per (setting that drops assignments, MoE layer): the capacity drop rate actually applied.",
    (
        Column("setting", "string", "the option as typed ('capacity-factor=1.0')"),
        Column("layer", "int64", "decoder-layer index"),
        Column("drop_rate", "float64", "dropped / all assignments of real tokens in this layer"),
        Column("tokens", "int64", "real tokens routed by this layer"),
    ),
)

IMPORTANCE = Schema(
    "importance",
    "One row per (MoE layer, expert) of the layers asked for: the loss cost of removing that expert alone.",
    (
        Column("layer", "int64", "decoder-layer index"),
        Column("expert", "int64", "expert id"),
        Column("delta_loss", "float64", "loss with the expert removed (masked before selection) - baseline loss"),
        Column("rank", "int64", "1 = the most important expert of its layer (largest delta_loss)"),
        Column("frequency", "float64", "share of real tokens that chose the expert (baseline pass)"),
        Column("mean_weight", "float64", "mean combine weight over the tokens that chose it"),
        Column("output_norm_saliency", "float64", "mean over routed tokens of weight x ‖expert output‖"),
    ),
)

GRADIENTS = Schema(
    "gradients",
    "One row per (MoE layer, expert): the gradient norm of the loss with respect to that expert's weights.",
    (
        Column("layer", "int64", "decoder-layer index"),
        Column("expert", "int64", "expert id"),
        Column("grad_norm", "float64", "L2 norm of d(batch mean loss)/d(expert weights), token-weighted over batches"),
        Column("tokens", "int64", "real tokens routed to the expert during the gradient passes"),
    ),
)

EXPERT_TOKENS = Schema(
    "expert_tokens",
    "With --top-tokens N: per (MoE router, routed expert) the N most frequent token ids and the N highest-lift ones.",
    (
        Column("layer", "int64", "decoder-layer index"),
        Column("router", "string", "'mlp' or 'attention' (JetMoE)"),
        Column("expert", "int64", "expert id"),
        Column("token_id", "int64", "token id"),
        Column("token", "string", "the token decoded on its own"),
        Column("count", "int64", "times this token id chose the expert at any rank"),
        Column("first_choice", "int64", "times this token id had the expert as its rank-0 choice"),
        Column("share_of_expert", "float64", "count / the expert's assignments"),
        Column("lift", "float64", "share_of_expert / the token id's share of the corpus (1 = no preference)"),
        Column("listed", "string", "'frequent', 'lift' (count >= --min-count) or 'both'"),
    ),
)

# Appended to layers.csv when token ids are counted (``balance --top-tokens``).
VOCAB_SPECIALIZATION = (
    Column(
        "vocab_specialization",
        "float64",
        "OLMoE: per token id, share of its occurrences sent to its most frequent first-choice expert, "
        "averaged over ids weighted by occurrences",
    ),
    Column(
        "vocab_specialization_random",
        "float64",
        "the same if first choices were drawn from the layer's first-choice load regardless of the token",
    ),
)

PLACEMENT = Schema(
    "placement",
    "One row per (MoE layer, physical expert slot) of an EPLB placement (`plan`'s placement.csv).",
    (
        Column("layer", "int64", "decoder-layer index"),
        Column("physical_slot", "int64", "physical expert slot; slots are contiguous per GPU"),
        Column("gpu", "int64", "expert-parallel rank holding the slot: physical_slot // slots per GPU"),
        Column("node", "int64", "node of that GPU: gpu // GPUs per node"),
        Column("logical_expert", "int64", "the model's expert id placed in the slot (hot experts appear twice+)"),
    ),
)

PLAN_LAYERS = Schema(
    "plan_layers",
    "One row per MoE layer: per-GPU load before (contiguous, no replicas) and after the EPLB placement.",
    (
        Column("layer", "int64", "decoder-layer index"),
        Column("max_over_mean_before", "float64", "max / mean tokens per GPU, contiguous placement"),
        Column("max_over_mean_after", "float64", "max / mean tokens per GPU, EPLB placement"),
        Column("balancedness_before", "float64", "mean / max tokens per GPU (what SGLang and vLLM log)"),
        Column("balancedness_after", "float64", "mean / max tokens per GPU after placement"),
        Column("speedup", "float64", "slowest GPU's load before / after: projected speed-up of the layer"),
        Column("cross_gpu_before", "float64", "share of token dispatches leaving the token's GPU (per-token only)"),
        Column("cross_gpu_after", "float64", "the same after placement, each token using its nearest replica"),
        Column("cross_node_before", "float64", "share of token dispatches leaving the token's node (per-token only)"),
        Column("cross_node_after", "float64", "the same after placement"),
    ),
)



COMPARE_LAYERS = Schema(
    "compare_layers",
    "One row per MoE router: how model B's routing of the same tokens differs from model A's.",
    (
        Column("layer", "int64", "decoder-layer index"),
        Column("tokens", "int64", "real tokens compared"),
        Column("first_choice_agreement", "float64", "share of tokens whose rank-0 expert is the same"),
        Column("topk_overlap", "float64", "mean size of S_A ∩ S_B over k (top-k sets)"),
        Column("topk_jaccard", "float64", "mean size of S_A ∩ S_B over size of S_A ∪ S_B"),
        Column("exact_set_agreement", "float64", "share of tokens with the same top-k set"),
        Column("weight_overlap", "float64", "mean over tokens of sum_e min(w_A, w_B), weights normalised to sum 1"),
        Column("routing_js", "float64", "mean per-token Jensen-Shannon divergence of the routing distributions, bits"),
        Column("load_tv", "float64", "total variation between the two assignment-share vectors"),
        Column("load_js", "float64", "Jensen-Shannon divergence between the two assignment-share vectors, bits"),
        Column("margin_changed", "float64", "A's mean k-th minus (k+1)-th probability on tokens whose set changed"),
        Column("margin_kept", "float64", "the same margin on tokens whose top-k set was kept"),
    ),
)

COMPARE_EXPERTS = Schema(
    "compare_experts",
    "One row per (MoE router, expert): its load under model A and model B (or corpus/run A and B).",
    (
        Column("layer", "int64", "decoder-layer index"),
        Column("expert", "int64", "expert id"),
        Column("count_a", "int64", "tokens that chose the expert under A"),
        Column("count_b", "int64", "tokens that chose the expert under B"),
        Column("share_a", "float64", "count_a / (tokens * k)"),
        Column("share_b", "float64", "count_b / (tokens * k)"),
        Column("share_diff", "float64", "share_b - share_a"),
        Column("log2_ratio", "float64", "log2(share_b / share_a); ±inf when one side is 0"),
    ),
)

COMPARE_SUMMARY = Schema(
    "compare_summary",
    "One row: the whole comparison, routing against output (run.json's compare_summary).",
    (
        Column("tokens", "int64", "real tokens compared"),
        Column("predicted_positions", "int64", "positions with a next token, over which the outputs are compared"),
        Column("top1_agreement", "float64", "share of positions where both models' most likely next token agree"),
        Column("output_kl", "float64", "mean KL(A || B) of the next-token distributions, nats, over kl_support"),
        Column("kl_support", "string", "the support the KL is computed over"),
        Column("first_choice_agreement", "float64", "mean over layers of first_choice_agreement"),
        Column("routing_js", "float64", "mean over layers of routing_js"),
        Column("worst_layer", "int64", "layer with the lowest first-choice agreement"),
        Column("worst_first_choice_agreement", "float64", "its first-choice agreement"),
        Column("mode", "string", "'two-pass' (one model in memory at a time) or 'together'"),
        Column("record_bytes", "float64", "disk used by model A's record (two-pass), bytes"),
        Column("record_bytes_per_token", "float64", "record_bytes / tokens"),
    ),
)

COMPARE_RUN_LAYERS = Schema(
    "compare_run_layers",
    "One row per MoE router when comparing two balance runs: the columns of compare_layers that apply.",
    (
        Column("layer", "int64", "decoder-layer index"),
        Column("load_tv", "float64", "total variation between the two runs' assignment-share vectors"),
        Column("load_js", "float64", "Jensen-Shannon divergence between them, bits"),
        STACK,
    ),
)

COMPARE_RUN_EXPERTS = Schema(
    "compare_run_experts",
    "One row per (MoE router, expert) when comparing two balance runs, with OLMoE's domain specialisation.",
    (
        *COMPARE_EXPERTS.columns,
        Column("specialisation_a", "float64", "token share in run A / uniform k/E (1 = uniform)"),
        Column("specialisation_b", "float64", "token share in run B / uniform k/E"),
        Column("specialises_in", "string", "the run whose specialisation is higher and above 1, else 'neither'"),
        STACK,
    ),
)


ALL = (
    ROUTE, LAYERS, EXPERTS, COACTIVATION, ROUTERS, EXPERT_TOKENS, ABLATION, ABLATION_LAYERS, IMPORTANCE, GRADIENTS,
    PLACEMENT, PLAN_LAYERS, COMPARE_LAYERS, COMPARE_EXPERTS, COMPARE_SUMMARY, COMPARE_RUN_LAYERS, COMPARE_RUN_EXPERTS,
)


def router_label(layer: int, router: str) -> str:
    """A table's short name for a router from its (layer, router) columns: '12', or '12a' for attention."""
    return f"{layer}{'a' if router == 'attention' else ''}"


_README_BLOCK = re.compile(r"<!-- schema: (\w+) -->\n(.*?)<!-- /schema -->", re.S)


def readme_block(schema: Schema) -> str:
    """What the README shows for a schema between its markers: the doc line, then the column table."""
    return f"{schema.doc}\n\n{schema.markdown()}\n"


def readme_drift(text: str) -> list[str]:
    """Names of the schemas whose README block is missing or differs from this module (empty: in sync)."""
    found = {m.group(1): m.group(2) for m in _README_BLOCK.finditer(text)}
    return [s.name for s in ALL if found.get(s.name) != readme_block(s)]


def sync_readme(path: str | Path) -> None:
    """Rewrite the schema blocks of a README (between ``<!-- schema: NAME -->`` and ``<!-- /schema -->``)."""
    path = Path(path)
    by_name = {s.name: s for s in ALL}
    text = _README_BLOCK.sub(
        lambda m: f"<!-- schema: {m.group(1)} -->\n{readme_block(by_name[m.group(1)])}<!-- /schema -->",
        path.read_text(encoding="utf-8"),
    )
    path.write_text(text, encoding="utf-8")
