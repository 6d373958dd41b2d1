"""Data-parallel compare: `torchrun --nproc-per-node 2 -m moe_inspect compare` (gloo, CPU) equals one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from test_distributed import TEXT
from tiny_models import save_tiny
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[str], Path]:
    """Two tiny Mixtrals of different seeds (same tokenizer) and the single-process run they are checked against."""
    from moe_inspect.cli import app

    root = tmp_path_factory.mktemp("dpcompare")
    a, b = save_tiny("mixtral", root / "a"), save_tiny("mixtral", root / "b", seed=1)
    corpus = root / "corpus.txt"
    corpus.write_text(TEXT, encoding="utf-8")
    args = ["compare", str(corpus), "-m", str(a), "--against", str(b), "--seq-len", "16", "--batch-size", "2"]
    args += ["--device", "cpu", "-q"]
    result = CliRunner().invoke(app, [*args, "--out", str(root / "one")])
    assert result.exit_code == 0, result.output
    return args, root / "one"


def _torchrun(args: list[str], out: Path, scratch: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    return subprocess.run(
        [*launcher, "-m", "moe_inspect", *args, "--out", str(out), "--scratch", str(scratch)],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )


@pytest.mark.parametrize("mode", ["two-pass", pytest.param("together", marks=pytest.mark.slow)])
def test_torchrun_two_ranks_compare_equal_one_process(setup, tmp_path: Path, mode: str) -> None:
    args, one = setup
    done = _torchrun([*args, *(["--together"] if mode == "together" else [])], tmp_path / "two", tmp_path / "scratch")
    assert done.returncode == 0, done.stderr[-3000:]
    scratch = tmp_path / "scratch"
    assert not scratch.exists() or list(scratch.iterdir()) == []  # each rank's record removed
    for name in ("compare_layers", "compare_experts"):
        ref, two = pd.read_csv(one / f"{name}.csv"), pd.read_csv(tmp_path / "two" / f"{name}.csv")
        assert list(two.columns) == list(ref.columns) and len(two) == len(ref) > 0
        for column in ref.columns:
            if ref[column].dtype.kind in "iu":
                assert two[column].tolist() == ref[column].tolist(), (name, column)  # counts: exactly
            else:
                assert two[column].to_numpy() == pytest.approx(ref[column].to_numpy(), rel=1e-9, nan_ok=True)
    ref_run = json.loads((one / "run.json").read_text())
    run = json.loads((tmp_path / "two" / "run.json").read_text())
    assert run["batches"] == ref_run["batches"] > 2  # both ranks had batches
    s, ref_s = run["compare_summary"], ref_run["compare_summary"]
    assert s["tokens"] == ref_s["tokens"] and s["predicted_positions"] == ref_s["predicted_positions"]
    assert s["first_choice_agreement"] < 1  # the two models do differ: the sums are not trivially equal
    for key in ("top1_agreement", "output_kl", "first_choice_agreement", "routing_js"):
        assert s[key] == pytest.approx(ref_s[key], rel=1e-9), key
    if mode == "two-pass":
        assert s["record_bytes"] == ref_s["record_bytes"]  # both ranks' records, summed


def test_per_token_under_torchrun_is_refused(setup, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from moe_inspect.cli import app

    args, _ = setup
    monkeypatch.setenv("WORLD_SIZE", "2")
    result = CliRunner().invoke(app, [*args, "--per-token", str(tmp_path / "t.csv")])
    assert result.exit_code == 2 and "one process" in result.output
    assert not (tmp_path / "t.csv").exists()


@pytest.mark.slow
def test_rank_with_no_batch_contributes_zeros(setup, tmp_path: Path) -> None:
    from moe_inspect.cli import app

    args, _ = setup
    limit = [*args, "--max-tokens", "20"]  # one batch of two 16-token windows: rank 1 compares nothing
    result = CliRunner().invoke(app, [*limit, "--out", str(tmp_path / "one")])
    assert result.exit_code == 0, result.output
    done = _torchrun(limit, tmp_path / "two", tmp_path / "scratch")
    assert done.returncode == 0, done.stderr[-3000:]
    for name in ("compare_layers", "compare_experts"):
        ref, two = pd.read_csv(tmp_path / "one" / f"{name}.csv"), pd.read_csv(tmp_path / "two" / f"{name}.csv")
        pd.testing.assert_frame_equal(two, ref, rtol=1e-9)
    assert json.loads((tmp_path / "two" / "run.json").read_text())["batches"] == 1
