"""`balance` as a stream: Ctrl-C in the middle of a forward pass, and memory that does not grow with the corpus."""

from __future__ import annotations

import gc
import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from cli_checks import assert_no_exception
from tiny_models import SAMPLE_TEXT
from typer.testing import CliRunner

from moe_inspect.analysis.accumulate import BalanceAccumulator
from moe_inspect.api import Inspector
from moe_inspect.cli import app
from moe_inspect.io.corpus import Batch


def _hook_counts(model: torch.nn.Module) -> list[tuple[str, int, int]]:
    return [(n, len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules()]


def _interrupt_inside_forward(monkeypatch: pytest.MonkeyPatch, batch: int, router: int) -> None:
    """Ctrl-C arrives while router ``router`` of batch ``batch`` runs, i.e. inside the model's forward."""
    real = BalanceAccumulator.__call__

    def interrupted(self: BalanceAccumulator, spec, out) -> None:
        if self.batches == batch and spec.index == router:
            raise KeyboardInterrupt
        real(self, spec, out)

    monkeypatch.setattr(BalanceAccumulator, "__call__", interrupted)


def test_ctrl_c_inside_a_forward_pass_api(tiny_inspector, monkeypatch: pytest.MonkeyPatch) -> None:
    insp: Inspector = tiny_inspector("mixtral", bos=True)
    before = _hook_counts(insp.model)
    _interrupt_inside_forward(monkeypatch, batch=3, router=1)
    report = insp.balance(SAMPLE_TEXT, seq_len=16, batch_size=2)
    assert report.partial and report.run["partial"] is True
    assert report.run["tokens"] == 2 * 2 * 16  # the two batches whose forward completed
    assert _hook_counts(insp.model) == before  # the interrupted forward left no hook behind
    # Routers before the interrupt point also counted the interrupted batch (documented in run_balance).
    assert report.layers["tokens"].tolist() == [96, 64, 64]
    k = int(report.layers["top_k"].iloc[0])
    sums = report.experts.groupby("layer")["count"].sum()
    assert sums.tolist() == [96 * k, 64 * k, 64 * k]
    monkeypatch.undo()
    # The model is usable afterwards and a full run equals the same run on a fresh capture.
    complete = insp.balance(SAMPLE_TEXT, seq_len=16, batch_size=2, max_tokens=64)
    assert not complete.partial
    pd.testing.assert_frame_equal(
        complete.experts[complete.experts["layer"] > 0].reset_index(drop=True),
        report.experts[report.experts["layer"] > 0].reset_index(drop=True),
    )


def test_ctrl_c_inside_a_forward_pass_cli(tiny_dir, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(SAMPLE_TEXT, encoding="utf-8")
    out = tmp_path / "out"
    _interrupt_inside_forward(monkeypatch, batch=2, router=2)
    args = ["balance", str(corpus), "-m", str(tiny_dir("mixtral", bos=True)), "--seq-len", "16", "--batch-size", "2"]
    result = CliRunner().invoke(app, [*args, "--out", str(out)])
    assert_no_exception(result, exit_code=130)
    assert "Interrupted" in result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["coactivation.csv", "experts.csv", "layers.csv", "run.json"]
    run = json.loads((out / "run.json").read_text())
    assert run["partial"] is True and run["tokens"] == 32
    assert pd.read_csv(out / "layers.csv")["tokens"].tolist() == [64, 64, 32]


def _live_tensor_bytes() -> tuple[int, int]:
    gc.collect()
    tensors = [o for o in gc.get_objects() if isinstance(o, torch.Tensor) and o.device.type != "meta"]
    return len(tensors), sum(t.numel() * t.element_size() for t in tensors)


def test_memory_does_not_grow_with_the_corpus(tiny_inspector) -> None:
    """Bounded check (not a benchmark): the tensors alive after 4 batches are those alive after 40."""
    insp: Inspector = tiny_inspector("mixtral", bos=True)
    seen: dict[int, tuple[int, int]] = {}

    def progress(batch: Batch) -> None:
        count = len(seen) + 1
        if count in (4, 40):
            seen[count] = _live_tensor_bytes()
        else:
            seen.setdefault(count, (0, 0))

    report = insp.balance(SAMPLE_TEXT * 12, seq_len=16, batch_size=2, max_tokens=40 * 2 * 16, progress=progress)
    assert report.run["batches"] == 40
    (count_4, bytes_4), (count_40, bytes_40) = seen[4], seen[40]
    assert count_40 == count_4, (count_4, count_40)
    assert bytes_40 == bytes_4, (bytes_4, bytes_40)
