"""`balance` as a stream: Ctrl-C in the middle of a forward pass keeps whole batches only, and memory does not grow
with the corpus."""

from __future__ import annotations

import gc
import json
import os
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import pytest
import torch
from cli_checks import assert_no_exception
from tiny_models import SAMPLE_TEXT
from typer.testing import CliRunner

from moe_inspect.analysis.accumulate import BalanceAccumulator
from moe_inspect.analysis.balance import BalanceReport
from moe_inspect.analysis.interrupts import interrupts_deferred
from moe_inspect.api import Inspector
from moe_inspect.cli import app
from moe_inspect.io.corpus import Batch


def _hook_counts(model: torch.nn.Module) -> list[tuple[str, int, int]]:
    return [(n, len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules()]


def _interrupt_inside_forward(monkeypatch: pytest.MonkeyPatch, batch: int, router: int) -> None:
    """Ctrl-C arrives while router ``router`` of batch ``batch`` runs, i.e. inside the model's forward."""
    real_call, real_begin = BalanceAccumulator.__call__, BalanceAccumulator.begin_batch
    begun = {"batches": 0}

    def begin(self: BalanceAccumulator, mask: torch.Tensor, decoder_mask: torch.Tensor | None = None) -> None:
        begun["batches"] += 1
        real_begin(self, mask, decoder_mask)

    def interrupted(self: BalanceAccumulator, spec, out) -> None:
        if begun["batches"] == batch and spec.index == router:
            raise KeyboardInterrupt
        real_call(self, spec, out)

    monkeypatch.setattr(BalanceAccumulator, "begin_batch", begin)
    monkeypatch.setattr(BalanceAccumulator, "__call__", interrupted)


@contextmanager
def _ctrl_c_in_router(module: torch.nn.Module, call: int) -> Iterator[None]:
    """Ctrl-C inside ``module``'s forward on its ``call``-th call, before the capture sees its output."""
    calls = {"n": 0}

    def hook(_module: torch.nn.Module, _args: object, _out: object) -> None:
        calls["n"] += 1
        if calls["n"] == call:
            raise KeyboardInterrupt

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _assert_same_report(partial: BalanceReport, clean: BalanceReport) -> None:
    """Every table of the interrupted run equals the clean run over the finished batches."""
    assert partial.partial and not clean.partial
    for name in ("tokens", "batches"):
        assert partial.run[name] == clean.run[name], name
    pd.testing.assert_frame_equal(partial.layers, clean.layers)
    pd.testing.assert_frame_equal(partial.experts, clean.experts)
    pd.testing.assert_frame_equal(partial.coactivation, clean.coactivation)
    if clean.expert_tokens is None:
        assert partial.expert_tokens is None
    else:
        pd.testing.assert_frame_equal(partial.expert_tokens, clean.expert_tokens)


def test_ctrl_c_inside_a_later_layer_keeps_exactly_the_finished_batches(tiny_inspector) -> None:
    """Ctrl-C in the last router of batch 3: layers, experts, coactivation and expert tokens cover batches 1-2.

    The earlier routers of batch 3 did run; none of what they saw may count (caught: committing a batch's
    sums in the router call, and counting expert tokens on the fly, both leave layers 0-1 at 3 batches).
    """
    insp: Inspector = tiny_inspector("mixtral", bos=True)
    before = _hook_counts(insp.model)
    last = insp.loaded.routers[-1]
    assert last.index > 0  # earlier routers ran in the interrupted forward
    options = {"seq_len": 16, "batch_size": 2, "top_tokens": 3, "min_count": 1}
    with _ctrl_c_in_router(last.module, call=3):
        partial = insp.balance(SAMPLE_TEXT, **options)
    assert _hook_counts(insp.model) == before  # the interrupted forward left no hook behind
    assert partial.run["partial"] is True and partial.run["tokens"] == 2 * 2 * 16 and partial.run["batches"] == 2
    assert set(partial.layers["tokens"]) == {64}
    k = int(partial.layers["top_k"].iloc[0])
    assert set(partial.experts.groupby("layer")["count"].sum()) == {64 * k}
    assert set(partial.expert_tokens.groupby(["layer", "expert"])["count"].max()) - {0}  # counted, not empty
    clean = insp.balance(SAMPLE_TEXT, **options, max_tokens=64)
    _assert_same_report(partial, clean)


def test_ctrl_c_inside_a_forward_keeps_the_finished_batches_of_every_file(tiny_inspector) -> None:
    """Per-file blocks: the first file whole, the second at its finished batches, 'all' their sum."""
    insp: Inspector = tiny_inspector("mixtral", bos=True)
    short, long = SAMPLE_TEXT[:120], SAMPLE_TEXT * 3
    options = {"seq_len": 16, "batch_size": 2, "pack": True, "by_file": True, "top_tokens": 2, "min_count": 1}
    first = insp.balance([short], **{k: v for k, v in options.items() if k != "by_file"})
    assert 0 < first.run["tokens"] <= 64  # so max_tokens=64 leaves it whole
    with _ctrl_c_in_router(insp.loaded.routers[-1].module, call=first.run["batches"] + 3):
        partial = insp.balance([short, long], **options)
    layers = partial.layers.groupby("source", sort=False)["tokens"].first()
    assert layers.to_dict() == {"<text 0>": first.run["tokens"], "<text 1>": 64, "all": first.run["tokens"] + 64}
    clean = insp.balance([short, long], **options, max_tokens=64)
    _assert_same_report(partial, clean)


def test_ctrl_c_inside_a_forward_pass_cli(tiny_dir, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(SAMPLE_TEXT, encoding="utf-8")
    out = tmp_path / "out"
    _interrupt_inside_forward(monkeypatch, batch=2, router=2)
    args = ["balance", str(corpus), "-m", str(tiny_dir("mixtral", bos=True)), "--seq-len", "16", "--batch-size", "2"]
    result = CliRunner().invoke(app, [*args, "--out", str(out), "--top-tokens", "2"])
    assert_no_exception(result, exit_code=130)
    assert "Interrupted" in result.stderr
    assert sorted(p.name for p in out.iterdir()) == [
        "coactivation.csv", "expert_tokens.csv", "experts.csv", "layers.csv", "run.json"
    ]
    run = json.loads((out / "run.json").read_text())
    assert run["partial"] is True and run["tokens"] == 32 and run["batches"] == 1
    assert pd.read_csv(out / "layers.csv")["tokens"].tolist() == [32, 32, 32]
    first_choices = pd.read_csv(out / "expert_tokens.csv").groupby("layer")["first_choice"].sum()
    assert (first_choices <= 32).all()


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


def test_ctrl_c_during_a_commit_arrives_after_it() -> None:
    """A SIGINT inside the commit block is held back until the block ends, then raised as usual."""
    done = []
    with pytest.raises(KeyboardInterrupt):
        with interrupts_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)  # the signal has been delivered to the holding handler by now
            done.append("commit")
        done.append("after")  # never reached
    assert done == ["commit"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back
