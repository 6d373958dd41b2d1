"""The tiny-model factory: every MoE family is found once, the tokenizers behave, and quirky families round-trip.

Why: the other tests loop over these folders, so a family missing from discovery, a tokenizer without its
specials, or a family that loses its selection biases on save/load would hide bugs in the inspector. Every family's
saved folder is checked where it is loaded anyway (test_all_families: biases non-zero and equal to the file); here
only the families with save/load quirks are rebuilt and compared with what was saved.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from tiny_models import CAUSAL_LM_CLASSES, SELECTION_BIAS_NAME, build_tiny_model, moe_families, train_tiny_tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

FAMILIES = moe_families()
TEXTS = [
    "def f_alpha(x, y):\n    return x + y * 3  # the router",
    "The quick brown fox jumps over the lazy dog.",
]


def test_families_are_deduplicated() -> None:
    """One model_type per causal-LM class, and the `_text` variant wins over its multimodal parent."""
    classes = [CAUSAL_LM_CLASSES[t] for t in FAMILIES]
    assert len(classes) == len(set(classes))
    assert not [t for t in FAMILIES if f"{t}_text" in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and f"{t}_text" in FAMILIES]
    assert {"mixtral", "deepseek_v3", "qwen3_moe", "gemma4_text", "llama4_text"} <= set(FAMILIES)
    assert not {"gemma4", "llama4", "qwen3_5_moe", "qwen4_exp", "dots3_note"} & set(FAMILIES)


def test_tokenizers() -> None:
    """Small byte-level BPE with the four special tokens, cached per process; the BOS variant prefixes <s>."""
    tok = train_tiny_tokenizer()
    assert tok is train_tiny_tokenizer()
    assert 300 <= len(tok) <= 400
    assert (tok.pad_token, tok.bos_token, tok.eos_token, tok.unk_token) == ("<pad>", "<s>", "</s>", "<unk>")
    assert tok.decode(tok("def f(x): return x").input_ids) == "def f(x): return x"
    plain = tok("def f(x): return x").input_ids
    assert tok.bos_token_id not in plain
    with_bos = train_tiny_tokenizer(bos=True)
    assert with_bos("def f(x): return x").input_ids == [tok.bos_token_id, *plain]
    assert with_bos.get_vocab() == tok.get_vocab()


def test_bos_folder_holds_the_same_weights(tiny_dir: Callable[..., Path]) -> None:
    from safetensors.torch import load_file

    plain = load_file(tiny_dir("mixtral") / "model.safetensors")
    bos = load_file(tiny_dir("mixtral", bos=True) / "model.safetensors")
    assert plain.keys() == bos.keys() and all(torch.equal(plain[k], bos[k]) for k in plain)
    assert AutoTokenizer.from_pretrained(tiny_dir("mixtral", bos=True))("a").input_ids[0] == 1


# Zaya: _init_weights re-sets the skip bias after loading; DeepSeek-V4: hash tables (tid2eid) are buffers;
# DeepSeek-V3: the correction bias is a buffer; LongCat: zero experts beside a corrected bias.
QUIRKY = ["zaya", "deepseek_v4", "deepseek_v3", "longcat_flash"]


@pytest.mark.parametrize("model_type", QUIRKY)
def test_round_trip(model_type: str, tiny_dir: Callable[..., Path]) -> None:
    """Save, reload offline, and check router logits and selection biases survive bit-exactly."""
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
    assert len(out.router_logits) == len(ref.router_logits) >= 2
    for got, want in zip(out.router_logits, ref.router_logits, strict=True):
        torch.testing.assert_close(got, want)  # linear-attention kernels may differ by an ulp between instances
    torch.testing.assert_close(out.logits, ref.logits)

    saved = reference.state_dict()
    loaded = model.state_dict()
    selection = [n for n in saved if SELECTION_BIAS_NAME.search(n) or n.endswith("tid2eid")]
    assert selection
    for name in selection:
        assert torch.equal(loaded[name], saved[name]), f"{name} changed on save/load"
        assert bool(saved[name].ne(0).any()), f"{name} is all zeros"
    for name, table in loaded.items():
        if name.endswith("tid2eid"):  # DeepSeek-V4 hash layers: distinct valid expert ids per token
            assert int(table.max()) < model.config.n_routed_experts
            assert all(len(set(row)) == len(row) for row in table.tolist())
