"""A model type transformers does not know (remote code) falls back to the shape heuristic, with a warning."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file


@pytest.fixture(scope="module")
def remote_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tiny_models import train_tiny_tokenizer, write_remote_code
    from transformers import MixtralConfig, MixtralForCausalLM

    path = tmp_path_factory.mktemp("remote")
    tokenizer = train_tiny_tokenizer()
    config = MixtralConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=6,
        num_experts_per_tok=2,
    )
    torch.manual_seed(0)
    model = MixtralForCausalLM(config)
    model.save_pretrained(path)
    # save_pretrained writes Mixtral's legacy per-expert names, which only the mixtral model type converts
    # back at load time; a remote-code type gets the module names as they are.
    state = {name: tensor.contiguous() for name, tensor in model.state_dict().items() if name != "lm_head.weight"}
    save_file(state | {"lm_head.weight": model.lm_head.weight.detach().clone()}, path / "model.safetensors")
    tokenizer.save_pretrained(path)
    write_remote_code(path, "tiny_remote_moe", json.loads((path / "config.json").read_text()))
    return path


def test_remote_code_routers_found_heuristically(remote_dir: Path) -> None:
    from moe_inspect.model.loading import load
    from moe_inspect.model.options import LoadOptions

    with pytest.warns(UserWarning, match="matched heuristically"):
        loaded = load(LoadOptions(str(remote_dir), trust_remote_code=True))
    assert [spec.path for spec in loaded.routers] == ["model.layers.0.mlp.gate", "model.layers.1.mlp.gate"]
    assert all(spec.heuristic and spec.num_experts == 6 and spec.top_k == 2 for spec in loaded.routers)

    # The heuristic still reads the router's own output: same experts as what the experts module received.
    received: list[torch.Tensor] = []
    handles = [
        loaded.model.get_submodule(spec.path.rsplit(".", 1)[0] + ".experts").register_forward_pre_hook(
            lambda _m, args: received.append(args[1])
        )
        for spec in loaded.routers
    ]
    from moe_inspect.model.capture import capture

    ids = loaded.tokenizer("def add(a, b): return a + b", return_tensors="pt")["input_ids"]
    try:
        with torch.inference_mode(), capture(loaded.routers) as cap:
            loaded.model(input_ids=ids)
    finally:
        for handle in handles:
            handle.remove()
    for calls, truth in zip(cap.calls, received, strict=True):
        assert torch.equal(calls[0].experts, truth)


def test_remote_code_without_trust_is_one_sentence(remote_dir: Path) -> None:
    from cli_checks import assert_one_line_error
    from typer.testing import CliRunner

    from moe_inspect.cli import app

    assert_one_line_error(CliRunner().invoke(app, ["route", "hi", "-m", str(remote_dir)]), "--trust-remote-code")
