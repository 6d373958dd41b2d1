"""bitsandbytes 4-bit and 8-bit loading on the CPU: routers stay full precision and capture still holds."""

from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("bitsandbytes")

from moe_inspect.capture import capture
from moe_inspect.loading import load

PROMPT = "def add(a, b): return a + b"
# bitsandbytes' CPU 4-bit packing needs in_features >= 64 and out_features % 32 == 0; LongCat's tiny MLA is narrower.
WIDE_ENOUGH = {"longcat_flash": {"q_lora_rank": 64, "kv_lora_rank": 64, "qk_rope_head_dim": 32, "head_dim": 32}}


@pytest.fixture(scope="module")
def quant_dir(tiny_dir, tmp_path_factory: pytest.TempPathFactory):
    from tiny_models import tiny_config, train_tiny_tokenizer
    from transformers import AutoModelForCausalLM

    def get(model_type: str) -> str:
        if model_type not in WIDE_ENOUGH:
            return str(tiny_dir(model_type))
        path = tmp_path_factory.mktemp(model_type)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(tiny_config(model_type, **WIDE_ENOUGH[model_type]))
        model.save_pretrained(path)
        train_tiny_tokenizer().save_pretrained(path)
        return str(path)

    return get


def _route(loaded, ids: torch.Tensor):
    with torch.inference_mode(), capture(loaded.routers) as cap:
        loaded.model(input_ids=ids)
    return cap


def _router_linears_full_precision(loaded) -> None:
    for spec in loaded.routers:
        for name, module in spec.module.named_modules():
            assert type(module).__name__ not in {"Linear4bit", "Linear8bitLt"}, f"{spec.path}.{name} was quantized"
            if isinstance(module, nn.Linear):
                assert module.weight.dtype in (torch.float32, torch.bfloat16, torch.float16)


@pytest.mark.parametrize(
    ("family", "bits"),
    # LongCat in 8-bit is left out: its attention (LongcatFlash expand_kv) fails under bitsandbytes' CPU int8
    # matmul with plain transformers too, routers skipped or not; the issue asks for 4-bit.
    [("mixtral", 4), ("mixtral", 8), ("dbrx", 4), ("dbrx", 8), ("longcat_flash", 4)],
)
def test_quantized_routers_stay_full_precision(quant_dir, family: str, bits: int) -> None:
    path = quant_dir(family)
    loaded = load(path, load_in_4bit=bits == 4, load_in_8bit=bits == 8)
    assert loaded.quantization == ("4bit-nf4" if bits == 4 else "8bit")
    quantized = [n for n, m in loaded.model.named_modules() if type(m).__name__ in {"Linear4bit", "Linear8bitLt"}]
    assert quantized, "nothing was quantized: the test would prove nothing"
    _router_linears_full_precision(loaded)
    reference = load(path)
    for spec, ref in zip(loaded.routers, reference.routers, strict=True):
        assert spec.path == ref.path
        for (name, tensor), (_, expected) in zip(
            spec.module.state_dict().items(), ref.module.state_dict().items(), strict=True
        ):
            assert torch.equal(tensor.float(), expected.float()), f"{spec.path}.{name} changed"
    (note,) = loaded.notes
    assert "routed experts" in note and "kept in full precision: " in note and "routers" in note

    ids = loaded.tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    cap = _route(loaded, ids)
    # The captured routing equals what the quantized model's own routers returned: re-run each router on
    # the hidden states it received and compare with the capture.
    inputs: dict[int, torch.Tensor] = {}
    handles = [
        spec.module.register_forward_pre_hook(lambda m, args, i=spec.index: inputs.__setitem__(i, args[0]))
        for spec in loaded.routers
    ]
    try:
        with torch.inference_mode():
            loaded.model(input_ids=ids)
    finally:
        for handle in handles:
            handle.remove()
    for spec, calls in zip(loaded.routers, cap.calls, strict=True):
        with torch.inference_mode():
            own = spec.module(inputs[spec.index]) if spec.parser == "tuple" else None
        if own is not None:
            torch.testing.assert_close(calls[0].logits, own[spec.logits_index].float())
            assert torch.equal(calls[0].experts, own[2].long())


def test_missing_bitsandbytes_is_one_sentence(monkeypatch: pytest.MonkeyPatch, tiny_dir) -> None:
    import builtins

    from moe_inspect.errors import UserError

    real_import = builtins.__import__

    def no_bnb(name: str, *args, **kwargs):
        if name == "bitsandbytes":
            raise ImportError("no bitsandbytes")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_bnb)
    with pytest.raises(UserError, match=r"pip install 'moe-inspect\[quant\]'"):
        load(str(tiny_dir("mixtral")), load_in_4bit=True)
