"""Default batch size and the per-batch peak memory that run.json reports."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import moe_inspect
from moe_inspect.analysis.batching import CPU_TOKENS_PER_BATCH, default_batch_size

TEXT = (Path(os.__file__).parent / "argparse.py").read_text(encoding="utf-8")


@pytest.fixture
def insp(tiny_inspector) -> moe_inspect.Inspector:
    return tiny_inspector("mixtral")


def test_cpu_default_is_a_fixed_number_of_tokens(insp: moe_inspect.Inspector) -> None:
    assert CPU_TOKENS_PER_BATCH == 8192
    assert default_batch_size(insp.loaded, 2048) == 4
    assert default_batch_size(insp.loaded, 100) == 81
    assert default_batch_size(insp.loaded, 10_000) == 1
    assert insp.corpus(TEXT, seq_len=256).batch_size == 32


def test_run_json_reports_peak_batch_memory(insp: moe_inspect.Inspector) -> None:
    report = insp.balance(TEXT, seq_len=256, batch_size=16, max_tokens=16 * 256)
    assert report.run["batch_size"] == 16 and report.run["batches"] == 1
    assert report.run["peak_batch_memory_method"].startswith("peak RSS")
    # at least the batch's input ids, attention mask and hidden states (16 x 256 x 64 float32) were resident
    assert report.run["peak_batch_memory_bytes"] >= 16 * 256 * 64 * 4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_default_fills_free_memory(tiny_dir) -> None:
    insp = moe_inspect.load(str(tiny_dir("mixtral")), device="cuda")
    size = default_batch_size(insp.loaded, 512)
    assert 1 <= size <= 256
    free_before = torch.cuda.mem_get_info()[0]
    report = insp.balance(TEXT, seq_len=512, batch_size=size, max_tokens=size * 512)
    assert report.run["peak_batch_memory_method"].startswith("cuda")
    assert 0 < report.run["peak_batch_memory_bytes"] <= free_before
