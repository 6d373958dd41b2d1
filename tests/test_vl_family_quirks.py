"""What is particular to some vision-language MoE families beyond "text routes through the language model".

ERNIE-4.5-VL keeps two expert sets per layer (text_moe, vision_moe) behind one recorded block: text prompts are
routed by the text set's router, and images, which would go to the vision set, are refused in one sentence.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from cli_checks import assert_one_line_error
from tiny_seq2seq_vl import build, save
from typer.testing import CliRunner

from moe_inspect.cli import app


@pytest.fixture(scope="module")
def ernie_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save("ernie4_5_vl_moe", tmp_path_factory.mktemp("ernie") / "ernie4_5_vl_moe")


def test_ernie_routes_text_through_the_text_experts(ernie_dir: Path) -> None:
    import moe_inspect

    loaded = moe_inspect.load(str(ernie_dir), device="cpu").loaded
    assert [spec.path for spec in loaded.routers] == [
        f"model.language_model.layers.{i}.mlp.text_moe.gate" for i in (1, 2)
    ]
    assert {spec.selection for spec in loaded.routers} == {"bias-corrected"}


def test_ernie_refuses_images_in_one_sentence(ernie_dir: Path, tmp_path: Path) -> None:
    from PIL import Image

    picture = tmp_path / "red.png"
    Image.new("RGB", (32, 32), (200, 30, 30)).save(picture)
    result = CliRunner().invoke(app, ["route", "hi", "-m", str(ernie_dir), "--image", str(picture)])
    assert_one_line_error(result, "sends image tokens to a separate set of vision experts")


@pytest.fixture(scope="module")
def omni_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save("qwen3_omni_moe", tmp_path_factory.mktemp("omni") / "qwen3_omni_moe")


def test_omni_loads_its_thinker_alone_with_the_checkpoints_weights(omni_dir: Path) -> None:
    """Every thinker weight is the checkpoint's (renamed out of ``thinker.``); no talker or code2wav is built."""
    from safetensors.torch import load_file

    import moe_inspect

    loaded = moe_inspect.load(str(omni_dir), device="cpu").loaded
    assert type(loaded.model).__name__ == "Qwen3OmniMoeThinkerForConditionalGeneration"
    saved = build("qwen3_omni_moe")  # what save() wrote, rebuilt from the same seed
    state, want = loaded.model.state_dict(), saved.thinker.state_dict()
    assert state.keys() == want.keys()
    assert all(torch.equal(state[name], want[name]) for name in state)
    names = load_file(omni_dir / "model.safetensors").keys()
    assert any(n.startswith("talker.") for n in names) and any(n.startswith("code2wav.") for n in names)
    assert not any(name.startswith(("talker", "code2wav")) for name, _ in loaded.model.named_children())
    assert len(loaded.notes) == 2 and loaded.notes[0].endswith(
        "(model.language_model); model.audio_tower is loaded but not run (moe-inspect routes no audio inputs); "
        "model.visual runs only when images are given."
    )
    assert loaded.notes[1] == (
        "Loaded the checkpoint's thinker alone: its talker (an MoE as well) and code2wav only run to generate "
        "speech, so moe-inspect neither loads nor routes them."
    )


def test_deepseek_ocr2_routes_images_through_its_real_processor(tmp_path: Path) -> None:
    """DeepSeek-OCR-2's processor builds offline with Pillow alone: image rows are the processor's image tokens,
    and every row (image positions included) is what the experts modules received in the model's own forward."""
    from experts_truth import experts_received
    from PIL import Image
    from tiny_vl_images import gradient, save_deepseek_ocr2

    import moe_inspect
    from moe_inspect.analysis.modality import processor_inputs
    from moe_inspect.model.capture import capture

    folder = save_deepseek_ocr2(tmp_path / "deepseek_ocr2")
    picture = tmp_path / "gradient.png"
    gradient(64).save(picture)
    insp = moe_inspect.load(str(folder), device="cpu")
    loaded = insp.loaded
    inputs = processor_inputs(insp.processor, ["Read this."], [[Image.open(picture)]])
    image = inputs["input_ids"][0] == insp.model.config.image_token_id
    assert int(image.sum()) == 257
    with (
        torch.inference_mode(),
        experts_received(loaded.model, loaded.routers) as received,
        capture(loaded.routers),
    ):
        loaded.model(**inputs)
    frame = insp.route("Read this.", images=[picture])
    for spec in loaded.routers:
        rows = frame[frame["layer"] == spec.layer].sort_values(["position", "rank"])
        assert (rows["modality"] == "image").sum() == 257 * spec.top_k
        table = rows["expert"].to_numpy().reshape(-1, spec.top_k)
        assert table.tolist() == received[spec.index][0].reshape(table.shape).tolist()
        assert len({tuple(row) for row in table[image.numpy()]}) > 3  # image tokens do not all route alike
