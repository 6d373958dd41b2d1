"""Image inputs (issue 17, part 4): route --image and balance --images on a vision-language MoE, offline.

One family end to end: a tiny random Aria checkpoint saved with its REAL processor (tests/tiny_vl_images.py), a
generated 64 x 64 gradient, loaded back through moe-inspect's own loader and ``AutoProcessor``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from cli_checks import assert_one_line_error
from experts_truth import experts_received
from tiny_vl_images import CHAT_TEMPLATE, IMAGE_TOKEN, gradient, image_folder, image_tokenizer, processor, save
from typer.testing import CliRunner

from moe_inspect import metrics
from moe_inspect.cli import app
from moe_inspect.model.capture import capture

PROMPT = "Describe this."
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def aria_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save(tmp_path_factory.mktemp("vlimg") / "aria")


@pytest.fixture(scope="module")
def aria(aria_dir: Path):
    import moe_inspect

    return moe_inspect.load(str(aria_dir), device="cpu")


@pytest.fixture(scope="module")
def picture(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("pics") / "gradient.png"
    gradient().save(path)
    return path


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return image_folder(tmp_path_factory.mktemp("pics") / "folder", count=3)


def processor_image_tokens(folder_or_dir: Path, picture: Path, images: int = 1) -> int:
    """How many image tokens the real processor makes for ``images`` copies of the picture, from its own figures:
    crops per image (pixel_values rows) x Aria's tokens per crop for the processed size (size_conversion)."""
    from PIL import Image
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(str(folder_or_dir))
    text = proc.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}] * images + [{"type": "text", "text": PROMPT}]}],
        tokenize=False,
    )
    encoded = proc(text=[text], images=[[Image.open(picture).convert("RGB")] * images], return_tensors="pt")
    per_crop = proc.size_conversion[int(encoded["pixel_values"].shape[2])]
    expected = int(encoded["pixel_values"].shape[0]) * per_crop
    assert int((encoded["input_ids"] == proc.image_token_id).sum()) == expected  # the processor agrees with itself
    return expected


@pytest.mark.parametrize("images", [1, 2])
def test_image_rows_per_layer_equal_the_processors_image_tokens(aria, aria_dir: Path, picture: Path, images) -> None:
    frame = aria.route(PROMPT, images=[str(picture)] * images)
    expected = processor_image_tokens(aria_dir, picture, images)
    assert expected == 256 * images  # Aria at its default 980-pixel size: 256 query tokens per image
    for spec in aria.loaded.routers:
        rows = frame[frame["layer"] == spec.layer]
        assert (rows["modality"] == "image").sum() == expected * spec.top_k
        assert set(rows.loc[rows["modality"] == "image", "token"]) == {IMAGE_TOKEN}
        assert (rows["modality"] == "text").sum() > 0  # the prompt is routed with the image
    assert set(frame["modality"]) == {"image", "text"}


def test_image_rows_are_what_the_experts_received(aria, aria_dir: Path, picture: Path) -> None:
    """The whole model's forward on the processor's inputs: captured = the experts modules' own inputs, and the
    route table (run without a head, stopped after the last router) = that capture, image positions included."""
    from PIL import Image

    from moe_inspect.analysis.modality import processor_inputs

    loaded = aria.loaded
    inputs = processor_inputs(aria.processor, [PROMPT], [[Image.open(picture)]])
    with (
        torch.inference_mode(),
        experts_received(loaded.model, loaded.routers) as received,
        capture(loaded.routers) as cap,
    ):
        loaded.model(**inputs)
    frame = aria.route(PROMPT, images=[picture])
    image = (inputs["input_ids"][0] == aria.model.config.image_token_index).numpy()
    distinct = []
    for spec, calls in zip(loaded.routers, cap.calls, strict=True):
        out = calls[0]
        truth = received[spec.index][0].reshape(out.experts.shape).long()
        assert torch.equal(out.experts, truth)
        rows = frame[frame["layer"] == spec.layer].sort_values(["position", "rank"])
        table = rows["expert"].to_numpy().reshape(-1, spec.top_k)
        assert table[image].tolist() == truth[torch.from_numpy(image)].tolist()
        assert table.tolist() == truth.tolist()
        distinct.append(len(np.unique(table[image], axis=0)))
    assert max(distinct) > 10  # image tokens route differently from each other: the equality above means something


def test_text_prompts_and_text_only_models_are_all_text(aria, tiny_inspector) -> None:
    assert set(aria.route(PROMPT)["modality"]) == {"text"}
    assert set(tiny_inspector("mixtral").route(PROMPT)["modality"]) == {"text"}


def test_the_prompt_is_the_chat_template_else_the_placeholder_first() -> None:
    from moe_inspect.analysis.modality import _prompt_text

    tokenizer = image_tokenizer()
    assert _prompt_text(processor(tokenizer), PROMPT, 2) == f"{IMAGE_TOKEN}\n{IMAGE_TOKEN}\n{PROMPT}"
    assert CHAT_TEMPLATE  # the template above is what placed the newline
    assert _prompt_text(processor(tokenizer, chat_template=None), PROMPT, 2) == f"{IMAGE_TOKEN}{IMAGE_TOKEN}{PROMPT}"


def test_total_variation_hand_worked() -> None:
    # shares (3/4, 1/4, 0, 0) and (1/4, 1/4, 1/4, 1/4): 0.5 * (1/2 + 0 + 1/4 + 1/4) = 0.5
    assert metrics.total_variation([3, 1, 0, 0], [1, 1, 1, 1]) == pytest.approx(0.5)
    assert metrics.total_variation([2, 0], [0, 5]) == pytest.approx(1.0)
    assert metrics.total_variation([1, 2, 3], [2, 4, 6]) == pytest.approx(0.0)


def test_balance_modality_blocks_add_up(aria, folder: Path) -> None:
    texts = ["def add(a, b): return a + b", "The cat sat on the mat."]
    report = aria.balance(texts, images=folder, batch_size=2)
    layers, experts = report.layers, report.experts
    assert list(dict.fromkeys(layers["modality"])) == ["text", "image", "all"]
    assert report.run["modalities"] == ["text", "image"]
    assert report.run["batches"] == 1 + 2  # the two texts, then 3 images two at a time (streamed per batch)
    assert report.run["image_files"] == [str(folder / n) for n in ("img0.png", "img1.jpg", "img2.png")]
    by = {m: experts[experts["modality"] == m].set_index(["layer", "expert"]) for m in ("text", "image", "all")}
    assert (by["text"]["count"] + by["image"]["count"]).equals(by["all"]["count"])
    assert (by["text"]["first_choice"] + by["image"]["first_choice"]).equals(by["all"]["first_choice"])
    tokens = layers.pivot_table(index="layer", columns="modality", values="tokens")
    assert (tokens["image"] == 3 * 256).all()
    assert (tokens["text"] + tokens["image"] == tokens["all"]).all()
    for spec in aria.loaded.routers:
        per = {m: by[m].loc[spec.layer]["count"].to_numpy() for m in by}
        tv = layers[layers["layer"] == spec.layer]["image_text_tv"]
        assert (tv == metrics.total_variation(per["image"], per["text"])).all()
        assert 0 < tv.iloc[0] < 1
    # the 'all' block is exactly a plain run (no split) over the same batches: every column, drop what-ifs included
    import itertools

    from moe_inspect.analysis.balance import run_balance
    from moe_inspect.analysis.modality import DEFAULT_IMAGE_PROMPT, image_batches

    files = sorted(p for p in folder.iterdir() if p.suffix != ".txt")
    batches = itertools.chain(
        aria.corpus(texts, batch_size=2).batches(),
        image_batches(aria.processor, files, DEFAULT_IMAGE_PROMPT, 2, aria.model.config),
    )
    plain = run_balance(aria.loaded, batches)
    all_layers = layers[layers["modality"] == "all"].drop(columns=["modality", "image_text_tv"])
    pd.testing.assert_frame_equal(all_layers.reset_index(drop=True), plain.layers, check_dtype=False)
    all_experts = experts[experts["modality"] == "all"].drop(columns="modality").reset_index(drop=True)
    pd.testing.assert_frame_equal(all_experts, plain.experts, check_dtype=False)


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "OMP_NUM_THREADS": "1", "COLUMNS": "100"}
    return subprocess.run(
        [sys.executable, "-c", "from moe_inspect.cli import main; main()", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
    )


def test_cli_end_to_end(aria_dir: Path, picture: Path, folder: Path, tmp_path: Path) -> None:
    route = _cli("route", PROMPT, "-m", str(aria_dir), "--image", str(picture), "--csv", "r.csv", "--html", "r.html",
                 cwd=tmp_path)
    assert route.returncode == 0, route.stderr
    frame = pd.read_csv(tmp_path / "r.csv")
    assert (frame.groupby("layer")["modality"].apply(lambda m: (m == "image").sum()) == 256 * 2).all()
    assert "… 253 more" in route.stdout  # a 256-token run cut in the terminal (first 2, last 1), never in the CSV
    assert "256 image token(s)" in route.stdout
    assert frame["position"].nunique() == 256 + (frame["modality"] == "text").sum() // (2 * 3)
    assert 'class="t' in (page := (tmp_path / "r.html").read_text()) and " media" in page
    balance = _cli("balance", "--images", str(folder), "-m", str(aria_dir), "--out", "out", "--batch-size", "2",
                   cwd=tmp_path)
    assert balance.returncode == 0, balance.stderr
    layers = pd.read_csv(tmp_path / "out" / "layers.csv")
    experts = pd.read_csv(tmp_path / "out" / "experts.csv")
    assert list(layers.columns[:2]) == ["modality", "layer"] and "image_text_tv" in layers
    assert set(experts["modality"]) == {"text", "image", "all"}
    assert "Image vs text expert load, total-variation distance per layer" in balance.stdout
    # --quiet is quiet with images too: loading the processor imports transformers' quantizers (torchao's kernel
    # messages and pytree warnings came out before the loggers were muted at the start of every command)
    quiet = _cli("route", PROMPT, "-m", str(aria_dir), "--image", str(picture), "-q", "--csv", "q.csv", cwd=tmp_path)
    assert (quiet.returncode, quiet.stdout, quiet.stderr) == (0, "", "")


@pytest.fixture(scope="module")
def no_processor_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save(tmp_path_factory.mktemp("vlimg") / "aria-bare", with_processor=False)


@pytest.fixture()
def no_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every refusal below comes before the weights load."""
    import moe_inspect.api

    def refuse(*_a, **_k):
        raise AssertionError("the weights were loaded before the refusal")

    monkeypatch.setattr(moe_inspect.api, "load_model", refuse)


def test_refusals_are_one_sentence_before_the_weights(
    no_weights, aria_dir: Path, no_processor_dir: Path, picture: Path, tiny_dir, tmp_path: Path
) -> None:
    from tiny_seq2seq_vl import save as save_seq2seq

    runner = CliRunner()
    text_only = str(tiny_dir("mixtral"))
    switch = str(save_seq2seq("switch_transformers", tmp_path / "switch"))
    not_image = tmp_path / "fake.png"
    not_image.write_text("plain text", encoding="utf-8")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images here", encoding="utf-8")
    cases = [
        (["route", PROMPT, "-m", text_only, "--image", str(picture)], "is a text-only model (mixtral); it takes no"),
        (["balance", "--images", str(empty), "-m", switch], "is an encoder-decoder text model; it takes no images"),
        (["route", PROMPT, "-m", str(no_processor_dir), "--image", str(picture)], "ships no processor"),
        (["route", PROMPT, "-m", str(aria_dir), "--image", str(tmp_path / "nope.png")], "No image file at"),
        (["route", PROMPT, "-m", str(aria_dir), "--image", str(not_image)], "is not an image file Pillow can read"),
        (["balance", "--images", str(empty), "-m", str(aria_dir)], "holds no image files"),
        (["balance", "-m", str(aria_dir)], "Give text files to measure, or an image folder"),
        # before the text corpus's own checks (this one is shorter than a window)
        (["balance", str(not_image), "--images", str(empty), "-m", str(aria_dir), "--by-file"],
         "Per-file blocks and images cannot be combined; balance images apart from --by-file."),
        (["route", PROMPT, "-m", str(aria_dir), "--image", str(picture), "--generate", "2"], "Generating after images"),
    ]
    for args, needle in cases:
        assert_one_line_error(runner.invoke(app, args), needle)


def test_qwen3_vl_images_route_and_pad_like_one_at_a_time(tmp_path: Path) -> None:
    """Qwen3-VL-MoE's forward with images (its 3-D RoPE positions come from the grid and the mask), through a
    stand-in for its processor (tiny_vl_images.QwenImageStandIn: the real one needs torchvision here)."""
    from tiny_vl_images import save_qwen3_vl

    import moe_inspect

    folder, stand_in = save_qwen3_vl(tmp_path / "qwen3_vl_moe")
    insp = moe_inspect.load(str(folder), device="cpu", processor=stand_in)
    square, wide = tmp_path / "a.png", tmp_path / "b.png"
    gradient(64).save(square)
    gradient(32, seed=1).resize((48, 32)).save(wide)
    frame = insp.route(PROMPT, images=[square, wide])
    grid = stand_in.image_processor(images=[gradient(64), gradient(32).resize((48, 32))])["image_grid_thw"]
    expected = int((grid.prod(-1) // 4).sum())
    assert expected == 16 + 6
    k = insp.loaded.routers[0].top_k
    assert (frame.groupby("layer")["modality"].apply(lambda m: int((m == "image").sum())) == expected * k).all()
    # two images of different sizes in one padded batch route exactly as each alone
    together = insp.balance(images=[square, wide], batch_size=2)
    alone = insp.balance(images=[square, wide], batch_size=1)
    assert together.run["batches"] == 1 and alone.run["batches"] == 2
    pd.testing.assert_frame_equal(together.experts, alone.experts)
    image_tokens = together.layers[together.layers["modality"] == "image"]["tokens"]
    assert (image_tokens == expected).all()
    # balance's image batches count what route's forward (the model's own positions) routed, expert by expert
    from moe_inspect.analysis.modality import DEFAULT_IMAGE_PROMPT

    one = insp.balance(images=[square], batch_size=1).experts
    rows = insp.route(DEFAULT_IMAGE_PROMPT, images=[square])
    counted = rows.groupby(["layer", "expert"]).size()
    measured = one[one["modality"] == "all"].set_index(["layer", "expert"])["count"]
    assert measured[measured > 0].to_dict() == counted.to_dict()


def test_api_takes_pil_images_and_refuses_in_one_sentence(aria, picture: Path, folder: Path, tiny_inspector) -> None:
    from PIL import Image

    from moe_inspect.errors import UserError

    from_pil = aria.route(PROMPT, images=[Image.open(picture)])
    pd.testing.assert_frame_equal(from_pil, aria.route(PROMPT, images=[picture]))
    with pytest.raises(UserError, match=r"^'.*' is a text-only model \(mixtral\); it takes no images\.$"):
        tiny_inspector("mixtral").route(PROMPT, images=[picture])
    with pytest.raises(UserError, match="Per-file blocks and images cannot be combined"):
        aria.balance(["some text"], images=folder, by_file=True)
    with pytest.raises(UserError, match="An image must be a file path or a PIL image, not int"):
        aria.route(PROMPT, images=[3])


def test_max_tokens_caps_text_and_images_together(aria, folder: Path) -> None:
    """Images are whole units: the run takes the images whose tokens fit in what the text left, and no more."""
    texts = ["def add(a, b): return a + b"]
    text_tokens = int(aria.balance(texts).layers["tokens"].iloc[0])
    three = aria.balance(images=folder, batch_size=3).layers
    image_tokens = int(three[three["modality"] == "all"]["tokens"].iloc[0]) // 3  # 256 placeholders + the prompt
    cap = text_tokens + 2 * image_tokens + 5  # room for two images, not three
    report = aria.balance(texts, images=folder, batch_size=3, max_tokens=cap)
    tokens = report.layers.pivot_table(index="layer", columns="modality", values="tokens")
    assert (tokens["image"] == 2 * 256).all() and (tokens["all"] <= cap).all()
    assert report.run["max_tokens"] == cap
    alone = aria.balance(images=folder, batch_size=2, max_tokens=image_tokens)  # images only: one fits
    assert (alone.layers.pivot_table(index="layer", columns="modality", values="tokens")["image"] == 256).all()


def test_ablate_a_vision_language_model_equals_its_checkpoint_reloaded_with_k(
    aria, aria_dir: Path, tmp_path: Path
) -> None:
    """A vision-language checkpoint's routers are its text model's (aria_text inside aria): ablate judges and
    re-routes them by that family, and top-k=1 equals the checkpoint saved with the text model's k set to 1."""
    import json
    import shutil

    import moe_inspect

    texts, opts = ["def add(a, b): return a + b", "The cat sat on the mat."], {"lines": True}
    report = aria.ablate(texts, **opts, top_k=[1])
    losses = dict(zip(report.ablation["setting"], report.ablation["loss"], strict=True))
    shutil.copytree(aria_dir, tmp_path / "k1")
    config = json.loads((tmp_path / "k1" / "config.json").read_text())
    config["text_config"]["moe_topk"] = 1
    (tmp_path / "k1" / "config.json").write_text(json.dumps(config))
    reloaded = moe_inspect.load(str(tmp_path / "k1"))
    assert reloaded.loaded.routers[0].top_k == 1
    assert losses["top-k=1"] == float(reloaded.ablate(texts, **opts).ablation.loc[0, "loss"])  # bit for bit
    assert losses["top-k=1"] != losses["baseline"]
