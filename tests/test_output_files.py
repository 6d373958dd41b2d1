"""What `balance --out/--plot` and `route --csv` write: the README's columns and types, run.json's keys,
null experts in the tables, atomic writes of run.json and the PNG, and one-sentence errors for bad paths."""

from __future__ import annotations

import builtins
import importlib
import json
import os
import re
from pathlib import Path
from typing import Any

import matplotlib.figure
import numpy as np
import pandas as pd
import pytest
import torch
from cli_checks import assert_no_exception, assert_one_line_error
from tiny_models import SAMPLE_TEXT
from typer.testing import CliRunner

from moe_inspect.cli import app
from moe_inspect.io import schemas
from moe_inspect.model.capture import capture
from moe_inspect.render.balance import write_heatmap_png

README = Path(__file__).resolve().parent.parent / "README.md"
cli_balance = importlib.import_module("moe_inspect.cli.balance")  # the package attribute is the command
runner = CliRunner()
RUN_KEYS = {
    "model", "model_type", "revision", "dtype", "device", "quantization", "tokens", "batches", "capacity_factors",
    "elapsed_s", "tokens_per_s", "partial", "routers", "packages", "python", "platform", "corpus", "seq_len",
    "batch_size", "mode", "max_tokens", "peak_batch_memory_bytes", "peak_batch_memory_method",
}


def readme_table(name: str) -> list[tuple[str, str]]:
    """(column, type) rows of the README's schema table under '### name'."""
    text = README.read_text(encoding="utf-8")
    section = text[text.index(f"\n### {name}\n") :]
    section = section[: section.index("\n### ", 1)] if "\n### " in section[1:] else section
    return re.findall(r"^\| `([a-z_0-9]+)` \| (\w+) \|", section, flags=re.MULTILINE)


@pytest.fixture(scope="module")
def balance_out(tiny_dir, tmp_path_factory: pytest.TempPathFactory) -> Path:
    corpus = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    corpus.write_text(SAMPLE_TEXT, encoding="utf-8")
    out = tmp_path_factory.mktemp("balance") / "out"
    args = ["balance", str(corpus), "-m", str(tiny_dir("mixtral", bos=True)), "--seq-len", "16", "--out", str(out)]
    assert_no_exception(runner.invoke(app, args))
    return out


@pytest.mark.parametrize("table", ["layers", "experts", "coactivation"])
def test_csv_columns_and_types_are_the_readmes(balance_out: Path, table: str) -> None:
    documented = readme_table(table)
    assert len(documented) >= 6
    assert [name for name, _ in documented] == getattr(schemas, table.upper()).names
    frame = pd.read_csv(balance_out / f"{table}.csv")
    extra = ["drop_rate_cf1", "drop_rate_cf1.25", "drop_rate_cf2"] if table == "layers" else []
    assert list(frame.columns) == [name for name, _ in documented] + extra
    want = dict(documented) | dict.fromkeys(extra, "float64")
    # read back by pandas: text columns as pandas' string type ('str' in pandas 3, 'object' before)
    got = {name: "string" if pd.api.types.is_string_dtype(t) else str(t) for name, t in frame.dtypes.items()}
    assert got == want
    assert len(frame) > 0


def test_run_json_keys(balance_out: Path, tiny_dir) -> None:
    run = json.loads((balance_out / "run.json").read_text())
    assert set(run) == RUN_KEYS | {"unrouted_tail_tokens"}
    from tiny_models import train_tiny_tokenizer

    tokens = len(train_tiny_tokenizer(bos=True)(SAMPLE_TEXT)["input_ids"])  # BOS + text, one stream
    assert run["unrouted_tail_tokens"] == tokens % 16 and run["tokens"] == tokens - tokens % 16
    assert run["mode"] == "packed" and run["capacity_factors"] == [1.0, 1.25, 2.0] and run["max_tokens"] is None
    assert [r["layer"] for r in run["routers"]] == [0, 1, 2]
    assert run["batch_size"] == 8192 // 16  # the CPU default: 8,192 tokens per batch
    assert run["batches"] == -(-run["tokens"] // 8192) and run["tokens_per_s"] > 0


def test_lines_mode_has_no_unrouted_tail(tiny_inspector) -> None:
    report = tiny_inspector("mixtral", bos=True).balance(SAMPLE_TEXT, seq_len=16, lines=True)
    assert set(report.run) == RUN_KEYS and report.run["mode"] == "lines"


def test_null_experts_in_route_and_balance(tiny_inspector) -> None:
    """LongCat's zero experts: expert_type 'zero' exactly on ids >= E, null_share their share of assignments."""
    insp = tiny_inspector("longcat_flash")
    spec = insp.loaded.routers[0]
    assert (spec.num_experts, spec.null_experts, spec.null_label) == (8, 2, "zero")
    frame = insp.route(SAMPLE_TEXT)
    assert list(frame.columns) == [name for name, _ in readme_table("route")]
    assert frame["expert_type"].tolist() == np.where(frame["expert"] >= 8, "zero", "routed").tolist()
    assert (frame["expert"] >= 8).any() and (frame["expert"] < 8).any()

    report = insp.balance(SAMPLE_TEXT, seq_len=16, pack=True)
    reader = insp.corpus(SAMPLE_TEXT, seq_len=16, pack=True)
    null = {s.layer: 0 for s in insp.loaded.routers}
    total = dict.fromkeys(null, 0)
    for batch in reader.batches():
        with torch.inference_mode(), capture(insp.loaded.routers) as cap:
            insp.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
        for s, calls in zip(insp.loaded.routers, cap.calls, strict=True):
            null[s.layer] += int((calls[0].experts >= s.num_experts).sum())
            total[s.layer] += calls[0].experts.numel()
    got = report.layers.set_index("layer")["null_share"]
    for layer in null:
        assert got[layer] == pytest.approx(null[layer] / total[layer], rel=1e-12)
    assert got.max() > 0


# ------------------------------------------------------------------------------------------------ atomic writes


def test_run_json_is_written_atomically(tiny_inspector, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    report = tiny_inspector("mixtral", bos=True).balance(SAMPLE_TEXT, seq_len=16)
    report.write(tmp_path)
    before = (tmp_path / "run.json").read_bytes()
    report.run["tokens"] = -1
    real_fsync = os.fsync
    calls = []

    def failing_fsync(fd: int) -> None:  # the 4th file is run.json: its bytes are written, then the disk fails
        calls.append(fd)
        if len(calls) == 4:
            raise OSError("disk full")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="disk full"):
        report.write(tmp_path)
    assert (tmp_path / "run.json").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["coactivation.csv", "experts.csv", "layers.csv", "run.json"]


def test_png_is_written_atomically(tiny_inspector, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    experts = tiny_inspector("mixtral", bos=True).balance(SAMPLE_TEXT, seq_len=16).experts
    path = tmp_path / "load.png"
    write_heatmap_png(experts, path)
    before = path.read_bytes()
    assert before[:8] == b"\x89PNG\r\n\x1a\n"

    def half_written(self: Any, target: Any, **_: Any) -> None:
        Path(target).write_bytes(b"\x89PNG half")
        raise OSError("disk full")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", half_written)
    with pytest.raises(OSError, match="disk full"):
        write_heatmap_png(experts, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["load.png"]


# ---------------------------------------------------------------------------------------------- bad output paths


@pytest.fixture
def no_model_load(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_args: Any, **_kwargs: Any) -> Any:
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(cli_balance, "load_for_cli", refuse)


def _balance(tiny_dir, tmp_path: Path, *extra: str) -> Any:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(SAMPLE_TEXT, encoding="utf-8")
    return runner.invoke(app, ["balance", str(corpus), "-m", str(tiny_dir("mixtral", bos=True)), *extra])


@pytest.mark.usefixtures("no_model_load")
def test_out_that_is_a_file(tiny_dir, tmp_path: Path) -> None:
    (tmp_path / "taken").write_text("x")
    result = _balance(tiny_dir, tmp_path, "--out", str(tmp_path / "taken"))
    assert_one_line_error(result, "is a file, not a folder")


@pytest.mark.usefixtures("no_model_load")
def test_plot_that_is_a_directory(tiny_dir, tmp_path: Path) -> None:
    assert_one_line_error(_balance(tiny_dir, tmp_path, "--plot", str(tmp_path)), "is a folder; name a file")


@pytest.mark.usefixtures("no_model_load")
def test_plot_without_matplotlib(tiny_dir, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = builtins.__import__

    def no_matplotlib(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    result = _balance(tiny_dir, tmp_path, "--plot", str(tmp_path / "p.png"), "--out", str(tmp_path / "o"))
    assert_one_line_error(result, "--plot needs matplotlib: pip install 'moe-inspect[plot]'")
    assert not (tmp_path / "o").exists() and not (tmp_path / "p.png").exists()
