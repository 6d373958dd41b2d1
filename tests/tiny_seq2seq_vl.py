"""Tiny random vision-language and encoder-decoder MoE checkpoints (issue 17), saved like a user's checkpoint.

The causal-LM families come from ``tiny_models``; these need their own builders: a Qwen3-VL-MoE with a tiny
vision tower, and Switch Transformers / NLLB-MoE whose expert capacity is set so that a short batch overflows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tiny_models import EXPERTS, _randomize_routing, tiny_config, train_tiny_tokenizer
from transformers import CONFIG_MAPPING, PretrainedConfig, PreTrainedModel

SEQ2SEQ_TYPES = ("switch_transformers", "nllb-moe")
SWITCH_CAPACITY = 3
"""Switch's per-sequence expert capacity in the tiny checkpoint: a 12-token sequence over 8 experts can overflow."""
NLLB_CAPACITY_FRACTION = 0.2
"""NLLB-MoE's eval capacity = ceil(0.2 * tokens) per expert: a short batch overflows its busiest experts."""


def vl_config() -> PretrainedConfig:
    """Qwen3-VL-MoE with a 2-layer MoE language model (tiny_models' text config) and a 1-block vision tower."""
    tokenizer = train_tiny_tokenizer()
    vocab = len(tokenizer)
    text = tiny_config("qwen3_vl_moe_text", rope_parameters={
        "rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 2, 2], "mrope_interleaved": True,
    })
    vision = {
        "depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": text.hidden_size,
        "patch_size": 8, "temporal_patch_size": 2, "spatial_merge_size": 2, "num_position_embeddings": 64,
        "deepstack_visual_indexes": [0],
    }
    return CONFIG_MAPPING["qwen3_vl_moe"](
        text_config=text.to_dict(), vision_config=vision, image_token_id=vocab - 4, video_token_id=vocab - 3,
        vision_start_token_id=vocab - 2, vision_end_token_id=vocab - 1,
        architectures=["Qwen3VLMoeForConditionalGeneration"],
    )


VL_TYPES = (
    "qwen3_vl_moe", "minimax_m3_vl", "inkling_mm_model", "aria", "mistral_large4", "qwen3_omni_moe_thinker",
    "glm4v_moe", "hy_v4_vl", "inkling2", "inkling2_loop", "step3p7",
    "ernie4_5_vl_moe", "qwen3_omni_moe", "glm5_next", "muse_spark", "deepseek_ocr2", "unlimited_ocr",
)
"""Vision-language MoE types routed by tests/test_vision_language.py."""

_TINY_TOWER = {
    "depth": 1, "num_hidden_layers": 1, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
    "num_attention_heads": 2, "out_hidden_size": 64, "embed_dim": 32, "patch_size": 8, "spatial_merge_size": 2,
    "num_layers": 1, "head_dim": 16, "num_key_value_heads": 2, "image_size": 32,
    "encoder_layers": 1, "d_model": 32, "encoder_attention_heads": 2, "encoder_ffn_dim": 64, "output_dim": 64,
    "downsample_hidden_size": 16,
}


_MROPE_4 = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]}
# Per-family fixes to the generic tiny configs: multimodal RoPE sections must fit the tiny rotary dims, and towers
# that project into the language model must name its hidden size.
_VL_TEXT: dict[str, dict[str, Any]] = {
    "glm4v_moe": {"rope_parameters": {**_MROPE_4, "partial_rotary_factor": 0.5}},
    "hy_v4_vl": {"rope_parameters": _MROPE_4},
    # Step-3.7: the default makes layers 0-2 dense; its text model builds a sliding mask whether or not it is used
    "step3p7": {"mlp_layer_types": ["dense", "sparse", "sparse"], "sliding_window": 16},
    # GLM-5-Next: no RoPE in its DSA attention; linear (KDA) layers, then an indexed one; layers 0-2 dense by default
    "glm5_next": {
        "qk_rope_head_dim": 0, "qk_nope_head_dim": 16, "v_head_dim": 16,
        "mlp_layer_types": ["dense", "sparse", "sparse"],
        "layer_types": ["linear_attention", "indexed_attention", "linear_attention"], "index_topk": 16,
        "index_kpool": 4, "index_head_dim": 16, "index_n_heads": 2, "linear_head_dim": 16, "linear_num_heads": 4,
        "hc_mult": 2,
    },
    "muse_spark": {"moe_hidden_size": 64, "sliding_window": 16},
    # DeepSeek-OCR-2's text config has no default MLP layer types (its published config lists them)
    "deepseek_ocr2": {"mlp_layer_types": ["dense", "sparse", "sparse"], "max_position_embeddings": 2048},
    # ERNIE-4.5-VL: one MoE intermediate size for the text experts, one for the vision experts; height and width
    # RoPE sections must be equal
    "ernie4_5_vl_moe": {"moe_intermediate_size": [32, 32], "rope_parameters": {**_MROPE_4, "mrope_section": [3, 3, 2]}},
}
_VL_TOWERS: dict[str, dict[str, Any]] = {
    "inkling2": {"text_hidden_size": 64}, "inkling2_loop": {"text_hidden_size": 64},
    # Muse Spark's audio encoder is a pyramid: one entry per level
    "muse_spark": {"patch_sizes": [4], "hidden_sizes": [32], "depths": [1], "pos_emb_height": 4, "pos_emb_width": 4,
                   "max_position_embeddings": 16},
}
# The OCR models' SAM encoder: small convolution pyramid and one global-attention block
_SAM = {"downsample_channels": [16, 32], "mlp_dim": 64, "global_attn_indexes": [0], "output_channels": 32,
        "window_size": 2}
_VL_TOWERS.update({"deepseek_ocr2": {**_SAM, "image_size": 1024, "patch_size": 16}, "unlimited_ocr": _SAM})
# Top-level fields that size the projection from the towers into the language model.
_VL_TOP: dict[str, dict[str, Any]] = {"muse_spark": {"out_hidden_size": 64, "projector_hidden_size": 64}}


def _tiny_tower(sub: PretrainedConfig, model_type: str) -> dict[str, Any]:
    """A tower's tiny fields; towers made of towers (DeepSeek-OCR-2's SAM + encoder) are made tiny all the way down."""
    from tiny_models import _config_fields

    fields = _config_fields(type(sub))
    tower = {**_TINY_TOWER, **_VL_TOWERS.get(model_type, {})}
    tiny = {"model_type": sub.model_type, **{k: v for k, v in tower.items() if k in fields}}
    for name in getattr(type(sub), "sub_configs", None) or {}:
        tiny[name] = _tiny_tower(getattr(sub, name), model_type)
    return tiny


def generic_vl_config(model_type: str) -> PretrainedConfig:
    """A VL config whose text sub-config is tiny_models' MoE text config and whose towers are 1 block of 32."""
    config_class = CONFIG_MAPPING[model_type]
    defaults = config_class()
    kwargs: dict[str, Any] = {}
    for name in getattr(config_class, "sub_configs", None) or {}:
        sub = getattr(defaults, name)  # the default sub-config says which class an AutoConfig slot holds
        if name == "text_config":
            kwargs[name] = tiny_config(sub.model_type, **_VL_TEXT.get(model_type, {})).to_dict()
        else:
            kwargs[name] = _tiny_tower(sub, model_type)
    from transformers.models.auto import modeling_auto

    kwargs["architectures"] = [modeling_auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES[model_type]]
    return config_class(**kwargs, **_VL_TOP.get(model_type, {}))


def omni_config() -> PretrainedConfig:
    """A whole Qwen3-Omni-MoE checkpoint: the tiny thinker above plus a tiny MoE talker and code-to-wave model."""
    thinker = generic_vl_config("qwen3_omni_moe_thinker")
    talker = {
        # the talker's config classes lack fields its modules read (shared_expert_intermediate_size,
        # spatial_merge_size): published configs carry them as extra keys
        "text_config": {**tiny_config("qwen3_omni_moe_talker_text").to_dict(), "shared_expert_intermediate_size": 32},
        "code_predictor_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                  "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 16,
                                  "vocab_size": 64, "num_code_groups": 2},
        "num_code_groups": 2, "thinker_hidden_size": thinker.text_config.hidden_size, "accept_hidden_layer": 1,
        "codec_eos_token_id": 60, "codec_nothink_id": 61, "codec_think_bos_id": 62, "codec_think_eos_id": 63,
        "codec_pad_id": 58, "codec_bos_id": 59, "spatial_merge_size": 2,  # also read but not a field
    }
    code2wav = {"codebook_size": 64, "hidden_size": 32, "num_attention_heads": 2, "num_key_value_heads": 2,
                "intermediate_size": 64, "num_hidden_layers": 1, "num_quantizers": 2, "upsample_rates": [2, 2],
                "upsampling_ratios": [2], "decoder_dim": 32, "sliding_window": 8}
    return CONFIG_MAPPING["qwen3_omni_moe"](
        thinker_config=thinker.to_dict(), talker_config=talker, code2wav_config=code2wav,
        architectures=["Qwen3OmniMoeForConditionalGeneration"],
    )


def seq2seq_config(model_type: str) -> PretrainedConfig:
    """Tiny Switch / NLLB-MoE: 2 encoder and 2 decoder blocks, MoE every second block, 8 experts."""
    tokenizer = train_tiny_tokenizer()
    common: dict[str, Any] = {
        "vocab_size": len(tokenizer), "d_model": 64, "num_experts": EXPERTS, "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id, "decoder_start_token_id": tokenizer.pad_token_id,
    }
    if model_type == "switch_transformers":
        return CONFIG_MAPPING[model_type](
            **common, d_kv=16, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4, num_sparse_encoder_layers=1,
            num_sparse_decoder_layers=1, expert_capacity=SWITCH_CAPACITY, architectures=[
                "SwitchTransformersForConditionalGeneration"],
        )
    return CONFIG_MAPPING[model_type](
        **common, encoder_layers=2, decoder_layers=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_sparse_step=2, decoder_sparse_step=2,
        max_position_embeddings=128, moe_eval_capacity_token_fraction=NLLB_CAPACITY_FRACTION,
        bos_token_id=tokenizer.bos_token_id, architectures=["NllbMoeForConditionalGeneration"],
    )


def build(model_type: str, seed: int = 0) -> PreTrainedModel:
    """The tiny model of ``model_type`` (qwen3_vl_moe, switch_transformers or nllb-moe), routers randomized."""
    import transformers

    if model_type == "qwen3_vl_moe":
        config = vl_config()
    elif model_type == "qwen3_omni_moe":
        config = omni_config()
    elif model_type in VL_TYPES:
        config = generic_vl_config(model_type)
    else:
        config = seq2seq_config(model_type)
    cls = getattr(transformers, config.architectures[0])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(config)
    _randomize_routing(model, torch.Generator().manual_seed(seed))
    return model.eval()


def save(model_type: str, path: Path, seed: int = 0) -> Path:
    """Build and save model + tiny tokenizer to ``path``."""
    model = build(model_type, seed)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    train_tiny_tokenizer().save_pretrained(path)
    return path


CHECKPOINT_MAPPINGS = (
    "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
    "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES",
    "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES",
    "MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES",
)


def checkpoint_moe_types() -> dict[str, list[str]]:
    """Every MoE model type a checkpoint can have in the installed transformers -> the kinds it loads as.

    A type counts when its modeling module records ``router_logits`` and some generation class (causal LM,
    image-text-to-text, seq2seq, multimodal LM) loads it; sub-model types (``x_vision``, ``x_text``) that no
    generation class loads on their own are parts of those checkpoints, not checkpoints.
    """
    from pathlib import Path as _Path

    import transformers
    from tiny_models import _modeling_module, _records_router_logits
    from transformers.models.auto import modeling_auto
    from transformers.models.auto.configuration_auto import model_type_to_module_name

    models_dir = _Path(transformers.__file__).parent / "models"
    found: dict[str, list[str]] = {}
    for name in CHECKPOINT_MAPPINGS:
        for model_type in getattr(modeling_auto, name):
            module_name = model_type_to_module_name(model_type)
            source = models_dir / module_name / f"modeling_{module_name}.py"
            if not source.is_file() or "router_logits" not in source.read_text(encoding="utf-8"):
                continue
            module = _modeling_module(model_type)
            if module is not None and _records_router_logits(module):
                found.setdefault(model_type, []).append(name.removeprefix("MODEL_FOR_").removesuffix("_MAPPING_NAMES"))
    return found
