"""Vision-language MoE checkpoints (issue 17): loaded as what they are, text routed through the language model.

A tiny Qwen3-VL-MoE (``Qwen3VLMoeForConditionalGeneration``, which AutoModelForCausalLM refuses) is built from its
config class with tiny text and vision sub-configs, saved, and loaded back through moe-inspect's own loader;
MiniMax-M3-VL and Inkling's multimodal model likewise, with generic one-block towers.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
from experts_truth import experts_received
from tiny_seq2seq_vl import VL_TYPES, save
from typer.testing import CliRunner

from moe_inspect.cli import app
from moe_inspect.model.capture import capture
from moe_inspect.model.source import IMAGE_TEXT, load_config, model_kind

TEXT = "def add(a, b): return a + b"


@pytest.fixture(scope="module")
def vl_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save("qwen3_vl_moe", tmp_path_factory.mktemp("vl") / "qwen3_vl_moe")


@pytest.fixture(scope="module")
def vl(vl_dir: Path):
    import moe_inspect

    return moe_inspect.load(str(vl_dir), device="cpu")


@pytest.fixture(scope="module")
def vl_family(tmp_path_factory: pytest.TempPathFactory, vl):
    import moe_inspect

    cache = {"qwen3_vl_moe": vl}

    def get(model_type: str):
        if model_type not in cache:
            folder = save(model_type, tmp_path_factory.mktemp("vl") / model_type)
            cache[model_type] = moe_inspect.load(str(folder), device="cpu")
        return cache[model_type]

    return get


def test_kind_and_class_come_from_the_config(vl_dir: Path, vl) -> None:
    assert model_kind(load_config(str(vl_dir))) == IMAGE_TEXT
    assert type(vl.model).__name__ == "Qwen3VLMoeForConditionalGeneration"
    assert vl.loaded.kind == IMAGE_TEXT
    assert all(spec.path.startswith("model.language_model.layers.") for spec in vl.loaded.routers)
    assert len(vl.loaded.routers) == 3
    assert vl.loaded.notes == [
        "Text and image tokens route through the language model (model.language_model); model.visual runs only "
        "when images are given."
    ]


@pytest.mark.parametrize("model_type", VL_TYPES)
def test_captured_experts_are_what_the_experts_received(model_type: str, vl_family) -> None:
    vl = vl_family(model_type)
    loaded = vl.loaded
    assert loaded.kind == IMAGE_TEXT
    assert loaded.notes[0].startswith("Text and image tokens route through the language model (model.language_model)")
    ids = vl.tokenizer(TEXT, return_tensors="pt")["input_ids"]
    with (
        torch.inference_mode(),
        experts_received(loaded.model, loaded.routers) as received,
        capture(loaded.routers) as cap,
    ):
        loaded.model(input_ids=ids)
    frame = vl.route(TEXT)
    for spec, calls in zip(loaded.routers, cap.calls, strict=True):
        out = calls[0]
        index, weights = received[spec.index]
        assert torch.equal(out.experts, index.reshape(out.experts.shape).long())
        torch.testing.assert_close(out.weights, weights.reshape(out.weights.shape).float())
        rows = frame[frame["layer"] == spec.layer].sort_values(["position", "rank"])
        assert rows["expert"].to_numpy().reshape(-1, spec.top_k).tolist() == out.experts.tolist()
    assert len(set(frame["expert"])) > 2  # routing is varied, so equality above means something
    assert set(frame["stack"]) == {"decoder"}


def test_route_cli_says_which_part_is_routed(vl_dir: Path, tmp_path: Path) -> None:
    csv = tmp_path / "route.csv"
    result = CliRunner().invoke(app, ["route", TEXT, "-m", str(vl_dir), "--csv", str(csv)])
    assert result.exit_code == 0, result.output
    assert "language model (model.language_model)" in result.output
    assert "qwen3_vl_moe: 3 routers" in result.output
    frame = pd.read_csv(csv)
    assert sorted(frame["layer"].unique()) == [0, 1, 2]


def test_generation_routes_through_the_language_model(vl) -> None:
    frame = vl.route(TEXT, generate=3)
    decode = frame[frame["phase"] == "decode"]
    assert decode["position"].nunique() == 3
    assert len(decode) == 3 * len(vl.loaded.routers) * 2  # 3 new tokens x 3 routers x top-2


def test_info_counts_the_towers_apart(vl) -> None:
    from tiny_seq2seq_vl import vl_config

    from moe_inspect.analysis.info import describe

    info = describe(vl_config())
    visual = sum(p.numel() for p in vl.model.model.visual.parameters())
    assert info.total_params == sum(p.numel() for p in vl.model.parameters())
    assert f"model.visual has {visual:,} parameters" in " ".join(info.notes)
    assert f"text tokens use {info.active_params - visual:,}." in " ".join(info.notes)
