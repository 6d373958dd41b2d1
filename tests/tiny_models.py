"""Tiny random checkpoints for every MoE causal-LM family registered in the installed transformers.

Why: the inspector must work on all families, and real checkpoints are gigabytes and need the Hub. Each family is
built from its own config class with hidden 64, 3 layers (layer 0 dense where the family has dense layers), 8 routed
experts and top-2, then saved next to a tiny byte-level BPE tokenizer trained offline, so tests load it exactly like
a user's checkpoint: ``AutoModelForCausalLM.from_pretrained(folder)`` (``causal_lm_class`` for the few it misses).

Random init is adjusted so that routing is informative: router weights get std 1/sqrt(fan_in) (so logits are O(1)
and tokens spread over experts) and every selection bias (``e_score_correction_bias``, ``expert_bias``, ...) gets
non-zero random values, since zero biases would hide bugs that ignore them.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import importlib
import inspect
import json
import math
import re
import tempfile
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerFast
from transformers.models.auto.configuration_auto import CONFIG_MAPPING, model_type_to_module_name
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
)

CAUSAL_LM_CLASSES: dict[str, str] = {
    **{t: c for t, c in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES.items() if c.endswith("ForCausalLM")},
    **MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
}
"""model_type -> causal-LM class, including those transformers files only under image-text-to-text (Mistral-4)."""


def causal_lm_class(model_type: str) -> type[PreTrainedModel]:
    """The class a causal-LM checkpoint of ``model_type`` loads with (AutoModelForCausalLM does not know them all)."""
    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return transformers.AutoModelForCausalLM
    return getattr(transformers, CAUSAL_LM_CLASSES[model_type])

HIDDEN = 64
LAYERS = 3
EXPERTS = 8
TOP_K = 2
HEADS = 4
KV_HEADS = 2
HEAD_DIM = 16
INTERMEDIATE = 64
MOE_INTERMEDIATE = 32
MAX_POSITIONS = 512
TOKENIZER_VOCAB = 384

# --------------------------------------------------------------------------------------------- family discovery


def _modeling_module(model_type: str) -> Any | None:
    """The family's ``modeling_*.py`` module, or None for entries without one (aliases of other modules)."""
    name = model_type_to_module_name(model_type)
    try:
        return importlib.import_module(f"transformers.models.{name}.modeling_{name}")
    except ModuleNotFoundError:
        return None


def _records_router_logits(module: Any) -> bool:
    """Whether a modeling module defines a PreTrainedModel that records ``router_logits`` (i.e. has routers)."""
    for obj in vars(module).values():
        if (
            inspect.isclass(obj)
            and issubclass(obj, PreTrainedModel)
            and obj.__module__ == module.__name__
            and "router_logits" in (getattr(obj, "_can_record_outputs", None) or {})
        ):
            return True
    return False


@functools.lru_cache(maxsize=1)
def _moe_families() -> tuple[str, ...]:
    """Cached discovery; the source text is pre-filtered so only MoE modeling modules get imported (fast)."""
    import transformers

    models_dir = Path(transformers.__file__).parent / "models"
    candidates: dict[str, str] = {}
    for model_type, class_name in CAUSAL_LM_CLASSES.items():
        module_name = model_type_to_module_name(model_type)
        source = models_dir / module_name / f"modeling_{module_name}.py"
        if not source.is_file() or "router_logits" not in source.read_text(encoding="utf-8"):
            continue
        module = _modeling_module(model_type)
        if module is not None and _records_router_logits(module):
            candidates[model_type] = class_name
    # One model_type per causal-LM class, and `x` dropped when `x_text` exists: the CausalLM takes the text config.
    kept: dict[str, str] = {}
    for model_type in sorted(candidates, key=lambda t: (not t.endswith("_text"), t)):
        class_name = candidates[model_type]
        if f"{model_type}_text" in candidates or class_name in kept.values():
            continue
        kept[model_type] = class_name
    return tuple(sorted(kept))


def moe_families() -> list[str]:
    """Every MoE causal-LM model_type of the installed transformers, one per CausalLM class."""
    return list(_moe_families())


# --------------------------------------------------------------------------------------------------- tokenizer

SAMPLE_TEXT = (
    "The quick brown fox jumps over the lazy dog. Routers send tokens to experts.\n"
    "def add(a, b):\n    return a + b\n"
    "Load balance and entropy: capacity factors 1.0, 1.25 and 2.0 drop tokens.\n"
) * 3
"""A few hundred tokens of mixed prose and code: enough packed windows of 16 for the corpus and balance tests."""

LINES = [
    "The fox.",
    "def add(a, b): return a + b",
    "Routers send each token to a few experts, and load balance matters.",
    "entropy",
    "Capacity factors drop tokens when an expert is full: 1.0, 1.25, 2.0.",
]
"""Lines of very different lengths, so ``--lines`` batches really hold padding."""


def _corpus() -> list[str]:
    """A few hundred lines of Python and English, generated deterministically (no files, no network)."""
    names = ["alpha", "beta", "gamma", "delta", "tokens", "experts", "router", "layer", "value", "count"]
    ops = ["+", "-", "*", "//", "%"]
    subjects = ["The router", "Each token", "A small model", "The expert", "This layer", "The tokenizer"]
    verbs = ["sends", "chooses", "weighs", "counts", "routes", "reads", "writes"]
    objects = ["two experts", "every token", "the hidden state", "a softmax score", "the load balance", "some text"]
    tails = ["quickly.", "in order.", "for the test.", "without a network.", "again and again.", "at random."]
    lines: list[str] = []
    for i in range(120):
        a, b = names[i % len(names)], names[(i * 3 + 1) % len(names)]
        op = ops[i % len(ops)]
        lines += [
            f"def f_{a}_{i}({a}, {b}):",
            f"    return {a} {op} {b} * {i % 7 + 1}",
            f"{a}_{i} = [{i}, {i + 1}, {i * 2}]  # list of {b}",
            f"for {a} in range({i % 9 + 2}):",
            f"    print({a!r}, {b})",
        ]
        lines.append(
            f"{subjects[i % len(subjects)]} {verbs[i % len(verbs)]} {objects[(i * 5) % len(objects)]} "
            f"{tails[(i * 7) % len(tails)]}"
        )
    lines += ["The quick brown fox jumps over the lazy dog.", "Mixture-of-experts models route tokens to experts."]
    return lines


@functools.lru_cache(maxsize=2)
def train_tiny_tokenizer(bos: bool = False) -> PreTrainedTokenizerFast:
    """A byte-level BPE (~384 tokens, specials <pad> <s> </s> <unk>) trained offline in a few milliseconds.

    With ``bos`` it prefixes ``<s>`` to every text, as Llama/Mixtral tokenizers do: the corpus tests need a
    tokenizer that adds BOS (packed streams hold it once per file, ``--lines`` once per line).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB,
        special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


# ------------------------------------------------------------------------------------------------------ configs

# Applied to every config class that has the field (dataclass field names, not attribute_map aliases).
_GENERIC: dict[str, Any] = {
    "hidden_size": HIDDEN,
    "d_model": HIDDEN,
    "num_hidden_layers": LAYERS,
    "n_layers": LAYERS,
    "num_attention_heads": HEADS,
    "n_heads": HEADS,
    "num_key_value_heads": KV_HEADS,
    "head_dim": HEAD_DIM,
    "intermediate_size": INTERMEDIATE,
    "moe_intermediate_size": MOE_INTERMEDIATE,
    "shared_expert_intermediate_size": MOE_INTERMEDIATE,
    "shared_experts_intermediate_size": MOE_INTERMEDIATE,
    "moe_shared_expert_intermediate_size": MOE_INTERMEDIATE,
    "shared_intermediate_size": MOE_INTERMEDIATE,
    "dense_intermediate_size": INTERMEDIATE,
    "intermediate_size_mlp": INTERMEDIATE,
    "ffn_hidden_size": INTERMEDIATE,
    "expert_ffn_hidden_size": MOE_INTERMEDIATE,
    "max_position_embeddings": MAX_POSITIONS,
    "max_seq_len": MAX_POSITIONS,
    # routed experts / top-k, whatever the family calls them
    "num_experts": EXPERTS,
    "num_local_experts": EXPERTS,
    "n_routed_experts": EXPERTS,
    "moe_num_experts": EXPERTS,
    "num_experts_per_tok": TOP_K,
    "num_experts_per_token": TOP_K,
    "moe_topk": TOP_K,
    "moe_k": TOP_K,
    "top_k_experts": TOP_K,
    "n_shared_experts": 1,
    "num_shared_experts": 1,
    "moe_num_shared_experts": 1,
    # group-limited routing (DeepSeek-V3 style): 2 groups of 4, keep 1
    "n_group": 2,
    "num_expert_group": 2,
    "topk_group": 1,
    # dense prefix
    "first_k_dense_replace": 1,
    "num_dense_layers": 1,
    # MLA
    "q_lora_rank": 32,
    "kv_lora_rank": 16,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8,
    "v_head_dim": HEAD_DIM,
    # sparse-attention indexers
    "index_topk": 16,
    "index_head_dim": HEAD_DIM,
    "index_n_heads": 2,
    # linear attention / mamba / conv hybrids
    "linear_key_head_dim": HEAD_DIM,
    "linear_value_head_dim": HEAD_DIM,
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
    "linear_head_dim": HEAD_DIM,
    "linear_num_heads": 4,
    "mamba_n_heads": 4,
    "mamba_d_state": 16,
    "mamba_chunk_size": 16,
    # multi-token-prediction heads are not needed
    "num_nextn_predict_layers": 0,
    "num_mtp_layers": 0,
}

_LINEAR_HYBRID = ["linear_attention", "full_attention", "linear_attention"]
_INKLING_SWA = {"swa_num_attention_heads": HEADS, "swa_num_key_value_heads": KV_HEADS, "swa_head_dim": HEAD_DIM}

# Family-specific fields (see the reference's §3.8 for why each is needed).
_FAMILY: dict[str, dict[str, Any]] = {
    # hybrids need at least one attention layer, otherwise the cache has no sequence length
    "bailing_hybrid": {"layer_types": _LINEAR_HYBRID},
    "granitemoehybrid": {"layer_types": _LINEAR_HYBRID, "mamba_n_groups": 1},
    "kimi_linear": {"layer_types": _LINEAR_HYBRID},
    "lfm2_moe": {"layer_types": ["conv", "full_attention", "conv"]},
    "minimax": {"layer_types": _LINEAR_HYBRID, "block_size": 16},
    "qwen3_5_moe_text": {"layer_types": _LINEAR_HYBRID},
    "qwen3_next": {"layer_types": _LINEAR_HYBRID, "mlp_only_layers": [0]},
    "qwen4_exp_text": {
        "layer_types": ["linear_attention", "indexed_attention", "linear_attention"],
        "indexer_n_heads": 2,
        "indexer_kv_heads": 1,
        "indexer_head_dim": HEAD_DIM,
        "indexer_budget": 16,
        "indexer_compress_ratio": 4,
        "hc_count": 2,
        "hc_lowrank": 8,
    },
    # Jamba: MoE iff i % period == offset, so 4 layers give dense 0 / MoE 1 / attention 2 / MoE 3
    "jamba": {
        "num_hidden_layers": 4,
        "expert_layer_period": 2,
        "expert_layer_offset": 1,
        "attn_layer_period": 4,
        "attn_layer_offset": 2,
    },
    # Nemotron-H: one mixer per layer (Mamba / MoE / attention / MoE)
    "nemotron_h": {
        "layers_block_type": ["linear_attention", "moe", "full_attention", "moe"],
        "num_hidden_layers": 4,
        "ssm_state_size": 16,
        "mamba_num_heads": 4,
        "mamba_head_dim": 32,
        "n_groups": 2,
        "chunk_size": 16,
    },
    # dense layer 0 for families whose default would give fewer than 2 MoE layers out of 3
    "beam": {"mlp_layer_types": ["dense", "sparse", "sparse"]},
    "flint": {"mlp_only_layers": [0]},
    "qwen2_moe": {"mlp_only_layers": [0]},
    "qwen3_moe": {"mlp_only_layers": [0]},
    "ernie4_5_moe": {"moe_layer_start_index": 1},
    "llama4_text": {"moe_layers": [1, 2]},
    "cohere2_moe": {"mlp_layer_types": ["dense", "sparse", "sparse"], "prefix_dense_intermediate_size": INTERMEDIATE},
    # DBRX cannot be built from the default attn_config (no rope_theta; clip_qkv=None crashes torch.clamp)
    "dbrx": {
        "attn_config": {"kv_n_heads": KV_HEADS, "rope_theta": 10000.0, "clip_qkv": 8.0},
        "ffn_config": {"ffn_hidden_size": MOE_INTERMEDIATE, "moe_num_experts": EXPERTS, "moe_top_k": TOP_K},
    },
    # Doge is dense unless is_moe; product-key routing needs a perfect-square number of experts
    "doge": {"is_moe": True, "num_experts": 16},
    # Gemma-4: the MoE block is opt-in; per-layer inputs default to a 262k-row embedding
    "gemma4_text": {
        "enable_moe_block": True,
        "layer_types": ["sliding_attention", "sliding_attention", "full_attention"],
        "sliding_window": 16,
        "hidden_size_per_layer_input": 16,
        "global_head_dim": 32,
    },
    # Zaya supports top-1 only (its router has an extra "skip" class)
    "zaya": {"num_experts_per_tok": 1, "router_hidden_size": 16},
    "deepseek_v2": {"topk_method": "group_limited_greedy"},
    # GPT-OSS: YaRN factor 32 over 4096 original positions; a smaller max would log a mismatch warning
    "gpt_oss": {"max_position_embeddings": 131072},
    # LongCat: 2 "double" layers (4 attention sublayers, 1 MoE each); head_dim is the RoPE part; 2 zero experts
    "longcat_flash": {"num_layers": 2, "zero_expert_num": 2, "head_dim": 8},
    # DeepSeek-V4: layer 0 routes by token-id lookup (hash_moe, not recorded in router_logits)
    "deepseek_v4": {"mlp_layer_types": ["hash_moe", "moe", "moe"], "o_groups": 2, "o_lora_rank": 16},
    # Dots3: sliding-window layers take their own MLA sizes from swa_* kwargs (defaults are huge)
    "dots3_note_text": {
        "sliding_window": 16,
        "swa_num_attention_heads": HEADS,
        "swa_num_key_value_heads": HEADS,
        "swa_q_lora_rank": 32,
        "swa_kv_lora_rank": 16,
        "swa_head_dim": HEAD_DIM,
        "swa_qk_nope_head_dim": 8,
        "swa_v_head_dim": HEAD_DIM,
    },
    "inkling_text": {**_INKLING_SWA, "mlp_layer_types": ["dense", "sparse", "sparse"]},
    "inkling2_text": _INKLING_SWA,
    "jetmoe": {"kv_channels": HEAD_DIM},
    "mellum": {"mlp_layer_types": ["dense", "sparse", "sparse"]},
    "minimax_m3_vl_text": {"mlp_layer_types": ["dense", "sparse", "sparse"]},
}


def _config_fields(config_class: type) -> set[str]:
    """Names accepted by the (dataclass) config constructor."""
    if dataclasses.is_dataclass(config_class):
        return {f.name for f in dataclasses.fields(config_class)}
    return set(inspect.signature(config_class.__init__).parameters)


def tiny_config(model_type: str, **overrides: Any) -> PretrainedConfig:
    """Tiny config of ``model_type``: hidden 64, 3 layers (layer 0 dense where possible), 8 experts, top-2."""
    config_class = CONFIG_MAPPING[model_type]
    fields = _config_fields(config_class)
    kwargs: dict[str, Any] = {k: v for k, v in _GENERIC.items() if k in fields}
    tokenizer = train_tiny_tokenizer()
    kwargs["vocab_size"] = len(tokenizer)
    for key in ("vocab_size_per_layer_input", "unpadded_vocab_size"):
        if key in fields:
            kwargs[key] = len(tokenizer)
    for key in ("pad", "bos", "eos"):  # defaults point into the real 100k+ vocabularies
        kwargs[f"{key}_token_id"] = getattr(tokenizer, f"{key}_token_id")
    if "kv_lora_rank" in fields:  # MLA needs as many KV heads as query heads
        kwargs["num_key_value_heads"] = HEADS
    kwargs.update(_FAMILY.get(model_type, {}))
    kwargs.update(overrides)
    return config_class(**copy.deepcopy(kwargs))  # some configs edit their lists in place (Gemma-4 layer_types)


# ------------------------------------------------------------------------------------------------------- models

SELECTION_BIAS_NAME = re.compile(r"(^|\.)(e_score_correction_bias|expert_bias|balancing_biases)$")

# Bias std by what the bias is added to, chosen so that the bias changes a good share of the selections without
# dominating them: sigmoid / sqrt-softplus scores spread by ~0.2, softmax probabilities over 8-10 experts by ~0.1,
# raw logits by ~1 (router weights are re-drawn with std 1/sqrt(fan_in), so logits are O(1)).
_BIAS_STD_SOFTMAX_PROBS = {"ernie4_5_moe": 0.05, "longcat_flash": 0.05, "zaya": 0.05}
_BIAS_STD_RAW_LOGITS = {"kolibri1": 0.5}
_BIAS_STD_DEFAULT = 0.15
_ZAYA_SKIP_BIAS = -1.0
# Routers whose logits come out of a small MLP need a larger last layer to reach O(1) logits.
_ROUTER_GAIN: dict[str, tuple[str, float]] = {"zaya": ("router_mlp.out_proj.weight", 3.0)}


def _router_classes(model: PreTrainedModel) -> tuple[type, ...]:
    """Module classes recorded as ``router_logits`` by any PreTrainedModel inside ``model``."""
    classes: list[type] = []
    for sub in model.modules():
        spec = (getattr(type(sub), "_can_record_outputs", None) or {}).get("router_logits")
        for item in spec if isinstance(spec, (list, tuple)) else [spec]:
            cls = getattr(item, "target_class", item)
            if inspect.isclass(cls) and cls not in classes:
                classes.append(cls)
    return tuple(classes)


def _bias_std(model_type: str) -> float:
    """How large the random selection biases of ``model_type`` should be (see the tables above)."""
    return _BIAS_STD_SOFTMAX_PROBS.get(model_type, _BIAS_STD_RAW_LOGITS.get(model_type, _BIAS_STD_DEFAULT))


def _randomize_routing(model: PreTrainedModel, generator: torch.Generator) -> None:
    """Router weights ~ N(0, 1/fan_in) and non-zero selection biases, so routing is varied and bias-dependent."""
    router_classes = _router_classes(model)
    model_type = model.config.model_type
    gain_name, gain = _ROUTER_GAIN.get(model_type, ("", 1.0))
    with torch.no_grad():
        for _, module in model.named_modules():
            # DeepSeek-V4's hash router is not recorded, but its weight still scores the looked-up experts
            if not isinstance(module, router_classes) and not type(module).__name__.endswith("HashRouter"):
                continue
            whole_block = not re.search(r"Router|Gate|Gating", type(module).__name__)
            for pname, param in module.named_parameters():
                if whole_block and not re.search(r"router|(^|\.)gate\.weight$", pname):  # ERNIE-VL: text_moe.gate
                    continue
                if param.dim() == 2:
                    std = (gain if pname == gain_name else 1.0) / math.sqrt(param.shape[-1])
                    param.copy_(torch.randn(param.shape, generator=generator) * std)
                elif pname.split(".")[-1] == "bias":  # e.g. GPT-OSS router bias: non-zero in real checkpoints
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
        for name, tensor in [*model.named_buffers(), *model.named_parameters()]:
            if SELECTION_BIAS_NAME.search(name) and tensor.is_floating_point():
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * _bias_std(model_type))
                if model_type == "zaya":
                    # Last column = skip expert. Zaya's _init_weights re-sets it to -1.0 after from_pretrained has
                    # loaded the checkpoint (transformers 5.23), so shift every column by -1.0 and keep the skip
                    # one at exactly -1.0: selection depends only on differences, the skip expert still wins for
                    # some tokens, and the reloaded model routes exactly like this one.
                    tensor.sub_(1.0)
                    tensor[-1] = _ZAYA_SKIP_BIAS
            elif name.endswith("tid2eid"):
                experts = model.config.n_routed_experts
                rows = torch.rand(tensor.shape[0], experts, generator=generator).argsort(dim=-1)
                tensor.copy_(rows[:, : tensor.shape[1]])


def build_tiny_model(
    model_type: str, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides: Any
) -> PreTrainedModel:
    """Random tiny model of ``model_type`` in eval mode, with informative routers and non-zero biases.

    Other dtypes go through save + ``from_pretrained(dtype=...)``, so ``_keep_in_fp32_modules_strict`` is applied
    as for a real checkpoint (a plain bf16 build crashes Inkling-2, whose router upcasts only its input).
    """
    config = tiny_config(model_type, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        cls = causal_lm_class(model_type)
        build = cls.from_config if hasattr(cls, "from_config") else cls._from_config  # auto class or the class
        model = build(config, dtype=torch.float32)
    _randomize_routing(model, torch.Generator().manual_seed(seed))
    if dtype != torch.float32:
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            model = causal_lm_class(model_type).from_pretrained(tmp, dtype=dtype)
    return model.eval()


def save_tiny(
    model_type: str,
    path: str | Path,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    bos: bool = False,
    **overrides: Any,
) -> Path:
    """Build, then save model + tokenizer (``bos``: one that prefixes <s>) to ``path`` for ``from_pretrained``."""
    path = Path(path)
    tokenizer = train_tiny_tokenizer(bos)
    model = build_tiny_model(model_type, seed=seed, dtype=dtype, **overrides)
    for key in ("pad", "bos", "eos"):
        token_id = getattr(tokenizer, f"{key}_token_id")
        setattr(model.config, f"{key}_token_id", token_id)
        if model.generation_config is not None:
            setattr(model.generation_config, f"{key}_token_id", token_id)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


__all__ = [
    "LINES",
    "SAMPLE_TEXT",
    "SELECTION_BIAS_NAME",
    "build_tiny_model",
    "moe_families",
    "save_tiny",
    "tiny_config",
    "train_tiny_tokenizer",
]


_REMOTE_MODELING = '''
from transformers import MixtralConfig
from transformers.models.mixtral.modeling_mixtral import MixtralForCausalLM, MixtralModel


class TinyRemoteConfig(MixtralConfig):
    model_type = "{model_type}"


class TinyRemoteModel(MixtralModel):
    config_class = TinyRemoteConfig
    _can_record_outputs = {{}}  # declares nothing, like most remote-code models


class TinyRemoteForCausalLM(MixtralForCausalLM):
    config_class = TinyRemoteConfig
    _can_record_outputs = {{}}

    def __init__(self, config):
        super().__init__(config)
        self.model = TinyRemoteModel(config)
        self.post_init()
'''


def write_remote_code(path: Path, model_type: str, config: dict[str, Any]) -> None:
    """Make ``path`` a remote-code model folder: a Mixtral clone under a model type transformers does not know,
    whose classes declare no router recorders (``trust_remote_code=True`` loads it from the folder)."""
    (path / "modeling_tiny_remote.py").write_text(_REMOTE_MODELING.format(model_type=model_type))
    config = {
        **config,
        "model_type": model_type,
        "architectures": ["TinyRemoteForCausalLM"],
        "auto_map": {
            "AutoConfig": "modeling_tiny_remote.TinyRemoteConfig",
            "AutoModelForCausalLM": "modeling_tiny_remote.TinyRemoteForCausalLM",
        },
    }
    (path / "config.json").write_text(json.dumps(config))
