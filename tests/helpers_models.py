"""Tiny MoE checkpoints with a tiny offline tokenizer, saved to a folder, for the balance and corpus tests.

Everything is built locally (no Hub): a byte-level BPE trained on a few sentences, and Mixtral /
DeepSeek-V3 configs with hidden size 32, 2-3 layers and 4-8 experts, so a forward costs milliseconds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

TRAIN_TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b\n",
    "Mixture-of-experts routers send each token to a few experts.",
    "Load balance, entropy and capacity factors describe the router.",
    "0123456789 + - * / = ( ) [ ] { } , . ; : ! ?",
]

SAMPLE_TEXT = (
    "The quick brown fox jumps over the lazy dog. Routers send tokens to experts.\n"
    "def add(a, b):\n    return a + b\n"
    "Load balance and entropy: capacity factors 1.0, 1.25 and 2.0 drop tokens.\n"
) * 3

LINES = [
    "The fox.",
    "def add(a, b): return a + b",
    "Routers send each token to a few experts, and load balance matters.",
    "entropy",
    "Capacity factors drop tokens when an expert is full: 1.0, 1.25, 2.0.",
]


def make_tokenizer(bos: bool = True) -> Any:
    """A byte-level BPE (vocab 300) wrapped as a fast tokenizer; with ``bos`` it prefixes ``<s>`` by default."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TRAIN_TEXT, trainer=trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
        )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def _mixtral(vocab: int) -> Any:
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return MixtralForCausalLM(config)


def _deepseek_v3(vocab: int) -> Any:
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    config = DeepseekV3Config(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=48,
        moe_intermediate_size=16,
        num_hidden_layers=2,
        first_k_dense_replace=0,
        num_attention_heads=4,
        num_key_value_heads=4,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        n_group=2,
        topk_group=1,
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
        kv_lora_rank=16,
        q_lora_rank=None,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=8,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = DeepseekV3ForCausalLM(config)
    # Spread the router scores (default init leaves every sigmoid near 0.5) and give every expert a
    # non-zero correction bias, so that bias-corrected, group-limited selection differs from a naive top-k.
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if name.endswith("mlp.gate.weight"):
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.3)
            elif name.endswith("e_score_correction_bias"):
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.15)
    return model


BUILDERS = {"mixtral": _mixtral, "deepseek_v3": _deepseek_v3}


def save_tiny(model_type: str, path: Path, bos: bool = True) -> Path:
    """Save a tiny ``model_type`` checkpoint and its tokenizer to ``path``; returns ``path``."""
    torch.manual_seed(0)
    tokenizer = make_tokenizer(bos=bos)
    model = BUILDERS[model_type](len(tokenizer))
    model.eval()
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
