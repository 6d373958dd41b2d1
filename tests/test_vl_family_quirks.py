"""What is particular to some vision-language MoE families beyond "text routes through the language model".

ERNIE-4.5-VL keeps two expert sets per layer (text_moe, vision_moe) behind one recorded block: text prompts are
routed by the text set's router, and images, which would go to the vision set, are refused in one sentence.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from cli_checks import assert_one_line_error
from tiny_seq2seq_vl import save
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
