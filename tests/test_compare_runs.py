"""`balance --by-file` and comparing two balance runs without a model, against hand computations from the CSVs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from tiny_models import EXPERTS, LINES, SAMPLE_TEXT, TOP_K

import moe_inspect
from moe_inspect.api import Inspector
from moe_inspect.errors import UserError

ROOT = Path(__file__).resolve().parent.parent
CODE = "def add(a, b):\n    return a + b\n" * 12
PROSE = "The quick brown fox jumps over the lazy dog. Routers send tokens to experts.\n" * 6


@pytest.fixture(scope="module")
def mixtral(tiny_inspector) -> Inspector:
    return tiny_inspector("mixtral")


@pytest.fixture(scope="module")
def runs(mixtral: Inspector, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("runs")
    mixtral.balance(CODE, seq_len=16).write(root / "code")
    mixtral.balance(PROSE, seq_len=16).write(root / "prose")
    return root / "code", root / "prose"


def test_by_file_blocks_equal_separate_runs_and_all_is_their_sum(mixtral: Inspector) -> None:
    report = mixtral.balance([CODE, PROSE], seq_len=16, batch_size=3, by_file=True)
    assert report.experts["source"].unique().tolist() == ["<text 0>", "<text 1>", "all"]
    assert report.layers.columns[0] == "source" and report.experts.columns[0] == "source"
    alone = [mixtral.balance(text, seq_len=16, batch_size=3) for text in (CODE, PROSE)]
    for name, single in zip(["<text 0>", "<text 1>"], alone, strict=True):
        block = report.experts[report.experts["source"] == name].drop(columns="source").reset_index(drop=True)
        pd.testing.assert_frame_equal(block, single.experts)
        layers = report.layers[report.layers["source"] == name].drop(columns="source").reset_index(drop=True)
        pd.testing.assert_frame_equal(layers, single.layers)
    total = report.experts[report.experts["source"] == "all"]
    assert total["count"].tolist() == (alone[0].experts["count"] + alone[1].experts["count"]).tolist()
    layers_all = report.layers[report.layers["source"] == "all"]
    assert layers_all["tokens"].tolist() == (alone[0].layers["tokens"] + alone[1].layers["tokens"]).tolist()
    # a ratio figure of the sums, recomputed by hand: dead experts and max/mean of the summed counts
    counts = total.pivot(index="layer", columns="expert", values="count").to_numpy()
    np.testing.assert_allclose(layers_all["max_over_mean"], counts.max(1) / counts.mean(1))


def test_compare_runs_against_hand_computation(runs: tuple[Path, Path]) -> None:
    code, prose = runs
    report = moe_inspect.compare_runs(code, prose)
    assert list(report.layers.columns) == ["layer", "load_tv", "load_js", "stack"]
    ea, eb = pd.read_csv(code / "experts.csv"), pd.read_csv(prose / "experts.csv")
    for layer, row in report.layers.set_index("layer").iterrows():
        sa = ea[ea["layer"] == layer]["share"].to_numpy()
        sb = eb[eb["layer"] == layer]["share"].to_numpy()
        assert row["load_tv"] == pytest.approx(0.5 * np.abs(sa - sb).sum(), abs=1e-12)
    experts = report.experts
    np.testing.assert_allclose(experts["share_diff"], experts["share_b"] - experts["share_a"])
    uniform = TOP_K / EXPERTS  # k / E of the tiny Mixtral
    spec_a, spec_b = ea["token_share"] / uniform, eb["token_share"] / uniform
    leans_b = np.where((spec_b > spec_a) & (spec_b > 1), "prose", "neither")
    expected = np.where((spec_a > spec_b) & (spec_a > 1), "code", leans_b)
    assert experts["specialises_in"].tolist() == expected.tolist()
    assert set(expected) >= {"code", "prose"}
    self_report = moe_inspect.compare_runs(code, code)
    assert (self_report.layers["load_tv"] == 0).all() and (self_report.layers["load_js"] == 0).all()


def test_compare_runs_bad_inputs(runs: tuple[Path, Path], tmp_path: Path) -> None:
    code, _ = runs
    with pytest.raises(UserError, match="is not a balance output folder"):
        moe_inspect.compare_runs(code, tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    for name in ("layers.csv", "experts.csv"):
        (other / name).write_bytes((code / name).read_bytes())
    run = json.loads((code / "run.json").read_text())
    (other / "run.json").write_text(json.dumps({**run, "model": "someone/else"}))
    with pytest.raises(UserError, match="compare runs of one model"):
        moe_inspect.compare_runs(code, other)


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-c", "from moe_inspect.cli import main; main()", *args],
        capture_output=True, text=True, cwd=cwd, env=env, timeout=300,
    )


def test_cli_compare_runs_and_balance_by_file(runs: tuple[Path, Path], tmp_path: Path, tiny_dir) -> None:
    code, prose = runs
    result = _cli("compare", str(code), str(prose), "--out", "cmp", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "separates code and prose most" in result.stdout
    written = pd.read_csv(tmp_path / "cmp" / "compare_experts.csv")
    assert "specialises_in" in written and "log2_ratio" in written
    bad = _cli("compare", str(code), str(tmp_path), "--out", "bad", cwd=tmp_path)
    assert bad.returncode == 2 and "not a balance output folder" in bad.stderr and not (tmp_path / "bad").exists()
    # --by-file on the CLI: the source column in both CSVs, and the runs comparison reads its 'all' block
    files = []
    for i, text in enumerate((SAMPLE_TEXT, "\n".join(LINES * 4))):
        files.append(tmp_path / f"f{i}.txt")
        files[-1].write_text(text)
    model = str(tiny_dir("mixtral"))
    args = ["-m", model, "--seq-len", "16", "--by-file", "--out", "bf"]
    by_file = _cli("balance", *map(str, files), *args, cwd=tmp_path)
    assert by_file.returncode == 0, by_file.stderr
    for name in ("layers.csv", "experts.csv"):
        frame = pd.read_csv(tmp_path / "bf" / name)
        assert frame["source"].unique().tolist() == [str(files[0]), str(files[1]), "all"]
    assert moe_inspect.compare_runs(tmp_path / "bf", tmp_path / "bf").layers["load_tv"].eq(0).all()
