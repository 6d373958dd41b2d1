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
        Column("stack", "string", "'encoder' or 'decoder' of an encoder-decoder ('decoder' for decoder-only models)"),
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

ALL = (ROUTE, LAYERS, EXPERTS, COACTIVATION, ROUTERS)


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
