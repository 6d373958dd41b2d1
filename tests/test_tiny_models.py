"""Smoke test of the tiny-model factory: every MoE family builds, saves, reloads offline and reports router logits.

Why: later tests loop over these folders, so a family that silently fails to build or loses its biases on save would
hide bugs in the inspector.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from tiny_models import SELECTION_BIAS_NAME, SKIPPED, build_tiny_model, moe_families, train_tiny_tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

FAMILIES = moe_families()
TEXTS = [
    "def f_alpha(x, y):\n    return x + y * 3  # the router",
    "The quick brown fox jumps over the lazy dog.",
]
# Families for which transformers records no router_logits at all (none in 5.23; DeepSeek-V4 only omits its
# hash_moe layer, whose experts come from a token-id lookup table).
NO_ROUTER_LOGITS: dict[str, str] = {}


def test_families_are_deduplicated() -> None:
    """One model_type per causal-LM class, and the `_text` variant wins over its multimodal parent."""
    classes = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[t] for t in FAMILIES]
    assert len(classes) == len(set(classes))
    assert not [t for t in FAMILIES if f"{t}_text" in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and f"{t}_text" in FAMILIES]
    assert {"mixtral", "deepseek_v3", "qwen3_moe", "gemma4_text", "llama4_text"} <= set(FAMILIES)
    assert not {"gemma4", "llama4", "qwen3_5_moe", "qwen4_exp", "dots3_note"} & set(FAMILIES)


def test_tokenizer() -> None:
    """Small byte-level BPE with the four special tokens, cached per process."""
    tok = train_tiny_tokenizer()
    assert tok is train_tiny_tokenizer()
    assert 300 <= len(tok) <= 400
    assert (tok.pad_token, tok.bos_token, tok.eos_token, tok.unk_token) == ("<pad>", "<s>", "</s>", "<unk>")
    assert tok.decode(tok("def f(x): return x").input_ids) == "def f(x): return x"


@pytest.mark.parametrize("model_type", FAMILIES)
def test_round_trip(model_type: str, tiny_dir: Callable[[str], Path]) -> None:
    """Save, reload offline, and check router logits and selection biases survive bit-exactly."""
    if model_type in SKIPPED:
        pytest.skip(SKIPPED[model_type])
    path = tiny_dir(model_type)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    assert model.config.vocab_size >= len(tok)
    assert (model.config.pad_token_id, model.config.eos_token_id) == (tok.pad_token_id, tok.eos_token_id)
    enc = tok(TEXTS, padding=True, return_tensors="pt")
    reference = build_tiny_model(model_type)  # same seed: what was saved
    with torch.no_grad():
        out = model(**enc, output_router_logits=True)
        ref = reference(**enc, output_router_logits=True)
    if model_type in NO_ROUTER_LOGITS:
        assert not out.router_logits
        return
    assert len(out.router_logits) > 0
    assert len(out.router_logits) == len(ref.router_logits)
    for got, want in zip(out.router_logits, ref.router_logits, strict=True):
        torch.testing.assert_close(got, want)  # linear-attention kernels may differ by an ulp between instances
    torch.testing.assert_close(out.logits, ref.logits)

    saved = reference.state_dict()
    loaded = model.state_dict()
    selection = [n for n in saved if SELECTION_BIAS_NAME.search(n) or n.endswith("tid2eid")]
    for name in selection:
        assert torch.equal(loaded[name], saved[name]), f"{name} changed on save/load"
        assert bool(saved[name].ne(0).any()), f"{name} is all zeros"
    for name, table in loaded.items():
        if name.endswith("tid2eid"):  # DeepSeek-V4 hash layers: distinct valid expert ids per token
            assert int(table.max()) < model.config.n_routed_experts
            assert all(len(set(row)) == len(row) for row in table.tolist())
