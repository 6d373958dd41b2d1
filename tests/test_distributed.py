"""Data-parallel balance: `torchrun --nproc-per-node 2 -m moe_inspect balance` (gloo, CPU) equals one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from tiny_models import save_tiny

import moe_inspect

ROOT = Path(__file__).resolve().parents[1]
TEXT = " ".join(f"Line {i}: the quick brown fox {i * 7 % 13} jumps over {i % 5} lazy dogs." for i in range(60))


@pytest.mark.parametrize(
    "max_tokens",
    [None, pytest.param(40, marks=pytest.mark.slow)],  # 40 tokens: one batch, so rank 1 routes nothing at all
)
def test_torchrun_two_ranks_equal_one_process(tmp_path: Path, max_tokens: int | None) -> None:
    model = save_tiny("mixtral", tmp_path / "model")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT, encoding="utf-8")
    limit = ["--max-tokens", str(max_tokens)] if max_tokens else []
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    args = ["balance", str(corpus), "-m", str(model), "--seq-len", "16", "--batch-size", "2", "--device", "cpu"]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    done = subprocess.run(
        [*launcher, "-m", "moe_inspect", *args, *limit, "--out", str(tmp_path / "two")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("Per-layer routing summary") == 1  # only rank 0 renders

    one = moe_inspect.load(str(model), device="cpu").balance(
        files=[corpus], seq_len=16, batch_size=2, max_tokens=max_tokens
    )
    run = json.loads((tmp_path / "two" / "run.json").read_text())
    assert run["tokens"] == one.run["tokens"] and run["batches"] == one.run["batches"]
    for name, frame in (("layers", one.layers), ("experts", one.experts), ("coactivation", one.coactivation)):
        two = pd.read_csv(tmp_path / "two" / f"{name}.csv")
        assert list(two.columns) == list(frame.columns)
        for column in frame.columns:
            if frame[column].dtype.kind in "iu":
                assert two[column].tolist() == frame[column].tolist(), (name, column)  # counts: exactly
            elif frame[column].dtype.kind == "f":
                assert two[column].to_numpy() == pytest.approx(frame[column].to_numpy(), rel=1e-9, nan_ok=True)
