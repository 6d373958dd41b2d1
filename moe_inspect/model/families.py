"""Model-family facts: the one place that knows how each MoE family in transformers routes.

Everything family-specific that the rest of the package needs lives here: how a router's output is
parsed into (logits, weights, experts), which probability distribution the family routes with, which
extra "null" expert columns its logits carry (LongCat zero experts, Zaya's skip expert), which router
modules transformers does not record, and which plain ``nn.Linear`` modules inside routers must be kept
out of bitsandbytes quantization. Facts come from ``shared/reference/transformers-moe-routers.md`` and
are asserted family by family in ``tests/test_all_families.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from moe_inspect.errors import UserError
from moe_inspect.metrics import Scoring

# How the k chosen weights are normalised: by the module's norm_topk_prob ("config"), always, never, or as a
# softmax over the chosen experts' logits (top-k first, then softmax).
WeightNorm = Literal["config", "always", "never", "softmax_over_chosen"]
Parser = Literal["tuple", "logits_only", "llama4", "jetmoe", "doge", "zaya", "switch", "nllb"]
# How ``ablate`` recomputes a family's selection from its router logits (see analysis/interventions.py):
# "softmax_topk": softmax over E, top-k, then ``weight_norm``; "topk_softmax": top-k logits, softmax over the k;
# "deepseek_v3": sigmoid, top-k of sigmoid + e_score_correction_bias within the best groups, unbiased weights,
# optional renormalisation, times routed_scaling_factor.
Reselect = Literal["softmax_topk", "topk_softmax", "deepseek_v3"]


@dataclass(frozen=True)
class FamilyFacts:
    """How one family routes; defaults describe the common Mixtral-style 3-tuple router."""

    scoring: Scoring = "softmax"
    # Experts are selected with score + a learned bias (DeepSeek-V3 "aux-loss-free" balancing and kin).
    bias_corrected: bool = False
    # Extra logit columns after the routed experts: zero-compute (LongCat) or skip (Zaya) experts.
    null_experts_attr: str | None = None
    null_expert_label: str = "null"
    # Config attribute that, when present, overrides ``scoring`` (DeepSeek-V4, Inkling-2, Cohere-2).
    scoring_attr: str | None = None
    # Router classes transformers does not record in ``output_router_logits`` (DeepSeek-V4 hash layers).
    extra_router_classes: tuple[str, ...] = ()
    # Recorder classes to skip because another recorded class holds the same router (JetMoE).
    skip_router_classes: tuple[str, ...] = ()
    # Names (relative to the recorded module) of plain nn.Linear layers that compute router logits,
    # when the recorded module is bigger than the router (Doge records the whole MoE block).
    router_linears: tuple[str, ...] | None = None
    # Families that ignore the configured k.
    fixed_top_k: int | None = None
    weight_norm: WeightNorm = "config"
    # The router's (logits, weights, index) contract is re-implemented by ``analysis/interventions.py`` for this
    # family, so its selection can be changed (top-k, removed experts, capacity); the rule is named here.
    reselect: Reselect | None = None
    # The router itself drops assignments beyond each expert's capacity (Switch, NLLB-MoE).
    capacity_limited: bool = False
    # The recorded module is a block holding one expert set per modality (ERNIE-4.5-VL's text_moe and vision_moe):
    # (router class, submodule of the text experts). Text tokens are routed by that router alone; image tokens
    # go to the other set, which moe-inspect does not capture, so images are refused for such a family.
    text_router: tuple[str, str] | None = None
    note: str = ""


_SIGMOID_BIAS = FamilyFacts(scoring="sigmoid", bias_corrected=True)
_SOFTMAX = FamilyFacts()

# Router-class name -> how to parse its forward output. Anything not listed is a standard
# ``(logits, top_k_weights, top_k_index)`` tuple, the contract of 50 of the 57 families in 5.23.
ROUTER_PARSERS: dict[str, Parser] = {
    "DbrxRouter": "logits_only",
    "Llama4Router": "llama4",
    "JetMoeTopKGating": "jetmoe",
    "DogeCDMoE": "doge",
    "ZayaRouter": "zaya",
    # Encoder-decoders whose routers apply expert capacity themselves and return dispatch masks (issue 17).
    "SwitchTransformersTop1Router": "switch",
    "NllbMoeTop2Router": "nllb",
}

FAMILIES: dict[str, FamilyFacts] = {
    # softmax routers whose plain top-k is the selection
    **{
        name: _SOFTMAX
        for name in """
            aria_text dbrx flex_olmo gpt_oss granitemoe granitemoe_swa granitemoehybrid
            granitemoeshared hunyuan_v1_moe jamba mellum minimax mixtral olmoe qwen2_moe
            qwen3_5_moe qwen3_5_moe_text qwen3_moe qwen3_next qwen4_exp qwen4_exp_text deepseek_v2 mistral4
            deepseek_ocr2 deepseek_ocr2_text unlimited_ocr unlimited_ocr_text
        """.split()
    },
    "cohere2_moe": FamilyFacts(scoring_attr="expert_selection_fn"),
    "ernie4_5_moe": FamilyFacts(bias_corrected=True, note="bias added to softmax probabilities"),
    "longcat_flash": FamilyFacts(
        bias_corrected=True, null_experts_attr="zero_expert_num", null_expert_label="zero",
        note="ids >= n_routed_experts are zero-compute identity experts",
    ),
    "zaya": FamilyFacts(
        bias_corrected=True, null_experts_attr="__one__", null_expert_label="skip",
        note="last logit column is a skip expert; the router rewrites a skip to expert 0 with weight 0",
    ),
    "doge": FamilyFacts(scoring="product_key", router_linears=("router_gate",),
                        note="product-key routing over sqrt(E) x sqrt(E) keys"),
    "gemma4": FamilyFacts(scoring="probabilities", note="router returns softmax probabilities"),
    "gemma4_text": FamilyFacts(scoring="probabilities", note="router returns softmax probabilities"),
    # sigmoid routers without a selection bias
    "flint": FamilyFacts(scoring="sigmoid"),
    "llama4": FamilyFacts(scoring="sigmoid"),
    "llama4_text": FamilyFacts(scoring="sigmoid"),
    # sigmoid (or other score) routers that select with score + bias
    **{
        name: _SIGMOID_BIAS
        for name in """
            afmoe axk1 axk2 bailing_hybrid beam deepseek_v3 deepseek_v32 dots1 dots3_note
            dots3_note_text exaone_moe glm4_moe glm4_moe_lite glm_moe_dsa hy_v3 hy_v4 inkling
            inkling_text kimi_linear laguna lfm2_moe mimo_v2_flash minimax_m2 minimax_m3_vl
            minimax_m3_vl_text nemotron_h solar_open step3p7 step3p5 glm5_next glm5_next_text
            muse_spark muse_spark_text
        """.split()
    },
    "kolibri1": FamilyFacts(scoring="sigmoid", bias_corrected=True, note="bias added to raw logits"),
    "inkling2_text": FamilyFacts(scoring="sigmoid", bias_corrected=True, scoring_attr="scoring_func"),
    "inkling2": FamilyFacts(scoring="sigmoid", bias_corrected=True, scoring_attr="scoring_func"),
    "deepseek_v4": FamilyFacts(
        scoring="sqrtsoftplus", bias_corrected=True, scoring_attr="scoring_func",
        extra_router_classes=("DeepseekV4HashRouter",),
        note="hash_moe layers pick experts by token id (tid2eid)",
    ),
}

# ERNIE-4.5-VL: modality-isolated experts; the text router adds its bias to the softmax probabilities (as ERNIE-4.5).
FAMILIES["ernie4_5_vl_moe"] = FAMILIES["ernie4_5_vl_moe_text"] = FamilyFacts(
    bias_corrected=True, weight_norm="always", text_router=("Ernie4_5_VLMoeMoeTopKRouter", "text_moe"),
    note="text tokens use the text experts (mlp.text_moe); image tokens use a separate vision expert set",
)
# JetMoE records the attention block and its inner gating; the gating alone is the router.
FAMILIES["jetmoe"] = FamilyFacts(skip_router_classes=("JetMoeAttention",), note="two routers per layer")
# PhiMoE's sparsemixer hard-codes two experts whatever num_experts_per_tok says.
FAMILIES["phimoe"] = FamilyFacts(fixed_top_k=2, note="sparsemixer always picks 2 experts")

# Encoder-decoders: the router drops assignments beyond each expert's capacity; route rows show them as dropped.
FAMILIES["switch_transformers"] = FamilyFacts(
    fixed_top_k=1, capacity_limited=True, weight_norm="never",
    note="top-1; tokens past an expert's per-sequence capacity skip the experts (dropped)",
)
FAMILIES["nllb-moe"] = FamilyFacts(
    fixed_top_k=2, capacity_limited=True, weight_norm="always",
    note="top-2 with capacity over the whole batch; second expert per second_expert_policy",
)

# Weight normalisation, for families whose modules hold no norm_topk_prob (reference file, sections 1-2).
_WEIGHT_NORMS: dict[WeightNorm, str] = {
    "always": "mixtral minimax hunyuan_v1_moe qwen3_5_moe qwen3_5_moe_text gemma4 gemma4_text minimax_m2 "
    "minimax_m3_vl minimax_m3_vl_text laguna afmoe hy_v3 zaya step3p7 step3p5 muse_spark muse_spark_text",
    "never": "jamba deepseek_v2 longcat_flash llama4 llama4_text deepseek_ocr2 deepseek_ocr2_text unlimited_ocr "
    "unlimited_ocr_text",
    "softmax_over_chosen": "aria_text gpt_oss granitemoe granitemoe_swa granitemoehybrid granitemoeshared jetmoe "
    "cohere2_moe",
}
for _norm, _names in _WEIGHT_NORMS.items():
    for _name in _names.split():
        FAMILIES[_name] = replace(FAMILIES.get(_name, FamilyFacts()), weight_norm=_norm)

# Families whose router selection ``ablate`` re-implements, checked in tests/test_ablate_families.py: with the
# family's own k and nothing removed, the recomputed (weights, index) equal the router's output bit for bit.
_RESELECT: dict[Reselect, str] = {
    "softmax_topk": "mixtral minimax qwen2_moe qwen3_moe olmoe flex_olmo qwen3_next qwen3_5_moe_text qwen4_exp_text "
    "mellum hunyuan_v1_moe jamba",
    "topk_softmax": "gpt_oss granitemoe granitemoeshared granitemoehybrid granitemoe_swa aria_text",
    "deepseek_v3": "deepseek_v3 glm4_moe dots1 deepseek_v32 glm4_moe_lite glm_moe_dsa exaone_moe solar_open "
    "mimo_v2_flash dots3_note_text",
}
for _rule, _names in _RESELECT.items():
    for _name in _names.split():
        FAMILIES[_name] = replace(FAMILIES[_name], reselect=_rule)

UNKNOWN_FAMILY = FamilyFacts(note="family not in moe-inspect's registry; softmax scoring assumed")

_SCORING_ALIASES: dict[str, Scoring] = {
    "softmax": "softmax",
    "sigmoid": "sigmoid",
    "sqrtsoftplus": "sqrtsoftplus",
}


def facts_for(model_type: str) -> FamilyFacts:
    """Facts for a model type; unknown (e.g. remote-code) families get conservative defaults."""
    return FAMILIES.get(model_type, UNKNOWN_FAMILY)


def scoring_for(model_type: str, config: object) -> Scoring:
    """The distribution a family routes with, honouring config overrides such as ``scoring_func``."""
    facts = facts_for(model_type)
    if facts.scoring_attr is not None:
        value = getattr(config, facts.scoring_attr, None)
        if isinstance(value, str) and value.lower() in _SCORING_ALIASES:
            return _SCORING_ALIASES[value.lower()]
    return facts.scoring


def null_expert_count(model_type: str, config: object) -> int:
    """Number of extra, non-routed columns in the router logits (zero or skip experts)."""
    attr = facts_for(model_type).null_experts_attr
    if attr is None:
        return 0
    if attr == "__one__":
        return 1
    return int(getattr(config, attr, 0) or 0)


# MoE model types transformers registers that moe-inspect does not route yet, each with the one reason why
# (tests/test_every_moe_type.py fails when a registered MoE type is neither routed nor listed here).
REFUSED: dict[str, str] = {
    "diffusion_gemma": "its decoder's routers denoise a canvas of canvas_length tokens that "
    "DiffusionGemmaModel.forward draws at random from the vocabulary (modeling_diffusion_gemma.py, line 1558), "
    "not the prompt's tokens, and routing its autoregressive encoder alone is not implemented",
}


@dataclass(frozen=True)
class CheckpointPart:
    """The one model of a multi-model checkpoint that reads the prompt; the loader loads it alone."""

    attr: str  # its attribute in the checkpoint's class (and its weights' prefix, which transformers strips)
    config_key: str  # its sub-config
    others: str  # what else the checkpoint holds and why it is not loaded (status line and info)


# Qwen3-Omni-MoE's class has no forward of its own: the thinker reads text, images and audio and writes text; the
# talker (an MoE too) and code2wav turn the thinker's states into speech, only when generating audio.
CHECKPOINT_PARTS: dict[str, CheckpointPart] = {
    "qwen3_omni_moe": CheckpointPart(
        "thinker", "thinker_config",
        "its talker (an MoE as well) and code2wav only run to generate speech, so moe-inspect neither loads nor "
        "routes them",
    ),
}


def checkpoint_part(config: object) -> CheckpointPart | None:
    """The part of a multi-model checkpoint that moe-inspect loads and routes, if the checkpoint is one."""
    return CHECKPOINT_PARTS.get(str(getattr(config, "model_type", "")))


def capacity_notes(config: object) -> list[str]:
    """What a capacity-limited family's config makes its routers do, stated once when the model loads."""
    model_type = str(getattr(config, "model_type", ""))
    if model_type == "switch_transformers":
        return [
            f"Switch routers keep at most {getattr(config, 'expert_capacity', '?')} tokens per expert per sequence "
            "(expert_capacity); later tokens are dropped and skip the experts."
        ]
    if model_type != "nllb-moe":
        return []
    fraction = getattr(config, "moe_eval_capacity_token_fraction", 0) or 0
    capacity = (
        f"ceil({fraction:g} x the batch's tokens) per expert" if fraction > 0
        else f"{getattr(config, 'expert_capacity', '?')} tokens per expert"
    )
    policy = getattr(config, "second_expert_policy", "all")
    notes = [f"NLLB-MoE routers keep {capacity} (capacity over the whole batch); later assignments are dropped."]
    policies = {
        "all": "every token also goes to its second expert",
        "sampling": "the second expert is chosen after adding Gumbel noise to the logits, so runs differ unless "
        "seeded, and the logits shown include the noise",
        "random": "the second expert is kept with probability 2 x its routing probability, so runs differ unless "
        "seeded, and a second expert the policy skipped is reported as dropped",
    }
    notes.append(f"Second-expert policy '{policy}': {policies.get(policy, 'not known to moe-inspect')}.")
    return notes


def check_supported(config: object) -> None:
    """Refuse, in one sentence, a checkpoint whose model type is in the refusal table."""
    model_type = str(getattr(config, "model_type", ""))
    if model_type in REFUSED:
        raise UserError(f"moe-inspect cannot route '{model_type}' checkpoints yet: {REFUSED[model_type]}.")


# Which config attributes name the placeholder token a vision-language model replaces by each modality's features
# (Qwen-VL and Qwen-Omni use *_token_id, Aria, Mistral-Large-4 and LLaVA-style configs *_token_index).
MODALITY_TOKEN_ATTRS: dict[str, tuple[str, ...]] = {
    "image": ("image_token_id", "image_token_index"),
    "video": ("video_token_id", "video_token_index"),
    "audio": ("audio_token_id", "audio_token_index"),
}
MODALITIES = ("text", *MODALITY_TOKEN_ATTRS)
"""Every ``modality`` a route row or balance block can carry, in table order; code i is ``MODALITIES[i]``."""


def modality_token_ids(config: object) -> dict[str, int]:
    """modality -> the placeholder token id the config names for it (a text-only config names none)."""
    found: dict[str, int] = {}
    for modality, names in MODALITY_TOKEN_ATTRS.items():
        for name in names:
            value = getattr(config, name, None)
            if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
                found[modality] = value
                break
    return found
