"""GPU checks: capture and accumulation stay on the device without host syncs, and agree with the CPU.

Skipped without CUDA (no GPU was available where these were written), so every check compares figures
rather than testing that something non-empty came back.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pandas as pd
import pytest
import torch
from experts_truth import experts_received

import moe_inspect
import moe_inspect.model.capture as capture_module
from moe_inspect.analysis.accumulate import BalanceAccumulator
from moe_inspect.model.capture import capture

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

TEXT = "\n".join(f"def f{i}(x):\n    return x * {i} + {i % 7}  # the quick brown fox" for i in range(80))
PROMPT = "def add(a, b): return a + b"
FIGURES = ["router_entropy", "top1_prob", "z_loss", "aux_loss", "switch_loss", "load_entropy", "max_over_mean"]


@pytest.mark.parametrize(("dtype", "rtol", "max_moved"), [("float32", 1e-4, 0.005), ("bfloat16", 3e-2, 0.05)])
def test_balance_on_cuda_matches_cpu(tiny_dir, dtype: str, rtol: float, max_moved: float) -> None:
    """Same tables on both devices: figures to ``rtol``; a near-tie may flip, so counts may move by a few."""
    path = str(tiny_dir("deepseek_v3"))
    cpu = moe_inspect.load(path, device="cpu", dtype=dtype).balance(TEXT, seq_len=32, batch_size=4)
    gpu = moe_inspect.load(path, device="cuda", dtype=dtype).balance(TEXT, seq_len=32, batch_size=4)
    assert gpu.run["device"] == "cuda" and cpu.run["device"] == "cpu"
    assert gpu.run["tokens"] == cpu.run["tokens"] > 1000
    assert gpu.layers["tokens"].tolist() == cpu.layers["tokens"].tolist()
    for name in FIGURES:
        np.testing.assert_allclose(gpu.layers[name], cpu.layers[name], rtol=rtol, err_msg=name)
    keys = ["layer", "expert"]
    pd.testing.assert_frame_equal(gpu.experts[keys], cpu.experts[keys])
    assignments = cpu.run["tokens"] * cpu.layers["top_k"].iloc[0]
    moved = np.abs(gpu.experts["count"].to_numpy() - cpu.experts["count"].to_numpy()).sum() / 2
    assert moved <= max_moved * assignments * len(cpu.layers), moved
    np.testing.assert_allclose(gpu.experts["mean_prob"], cpu.experts["mean_prob"], rtol=rtol, atol=1e-6)


@contextmanager
def _sync_errors() -> Iterator[None]:
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_capture_and_accumulator_do_not_sync_inside_the_forward(
    tiny_dir, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The model's own forward may sync; what moe-inspect runs in its hooks during the forward must not.

    Every router hook's parsing and every accumulator call of a real ``balance`` run executes with CUDA's
    sync debug mode set to raise, inside the capture; only the one mask copy per batch and device is left out.
    """
    insp = moe_inspect.load(str(tiny_dir("deepseek_v3")), device="cuda")
    calls = {"parse": 0, "accumulate": 0, "commit": 0}
    real_parse = capture_module.parse_output
    real_call = BalanceAccumulator.__call__

    def checked_parse(spec, out):
        calls["parse"] += 1
        with _sync_errors():
            return real_parse(spec, out)

    def checked_call(self, spec, out):
        calls["accumulate"] += 1
        self._mask_on(out.experts.device)  # the one host-to-device copy of the batch's mask
        with _sync_errors():
            return real_call(self, spec, out)

    monkeypatch.setattr(capture_module, "parse_output", checked_parse)
    real_end = BalanceAccumulator.end_batch

    def checked_end(self):
        calls["commit"] += 1
        with _sync_errors():  # the batch's sums are added into the totals on the device
            return real_end(self)

    monkeypatch.setattr(BalanceAccumulator, "__call__", checked_call)
    monkeypatch.setattr(BalanceAccumulator, "end_batch", checked_end)
    report = insp.balance(TEXT, seq_len=32, batch_size=4)
    batches = report.run["batches"]
    assert batches > 1
    routed = batches * len(insp.loaded.routers)
    assert calls == {"parse": routed, "accumulate": routed, "commit": batches}
    cpu = moe_inspect.load(str(tiny_dir("deepseek_v3")), device="cpu").balance(TEXT, seq_len=32, batch_size=4)
    assert report.layers["tokens"].tolist() == cpu.layers["tokens"].tolist()


def _received_by_experts(loaded, ids: torch.Tensor):
    """Capture, and the ids/weights each router's experts module received, in one forward."""
    with (
        torch.inference_mode(),
        experts_received(loaded.model, loaded.routers) as received,
        capture(loaded.routers) as cap,
    ):
        loaded.model(input_ids=ids.to(loaded.input_device))
    return [calls[0] for calls in cap.calls], received


def test_device_map_auto_on_cuda(tiny_dir) -> None:
    """accelerate placement on the GPU: the same experts as the CPU, weights to float32 rounding."""
    path = str(tiny_dir("mixtral"))
    insp = moe_inspect.load(path, device_map="auto")
    assert insp.loaded.input_device.type == "cuda"
    frame = insp.route(PROMPT)
    want = moe_inspect.load(path, device="cpu").route(PROMPT)
    pd.testing.assert_frame_equal(frame.drop(columns=["weight", "probability", "router_entropy"]),
                                  want.drop(columns=["weight", "probability", "router_entropy"]))
    for column in ("weight", "probability", "router_entropy"):
        np.testing.assert_allclose(frame[column], want[column], rtol=1e-4, atol=1e-6, err_msg=column)


def test_4bit_on_cuda(tiny_dir) -> None:
    """bitsandbytes' CUDA kernels: routers stay full precision and the capture is what the experts received."""
    insp = moe_inspect.load(str(tiny_dir("mixtral")), load_in_4bit=True, device="cuda")
    assert insp.loaded.quantization == "4bit-nf4"
    assert not [m for spec in insp.loaded.routers for m in spec.module.modules() if "4bit" in type(m).__name__]
    ids = insp.tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    captured, received = _received_by_experts(insp.loaded, ids)
    for spec, out in zip(insp.loaded.routers, captured, strict=True):
        index, weights = received[spec.index]
        assert out.experts.device.type == "cuda"
        assert torch.equal(out.experts, index.reshape(out.experts.shape).long())
        torch.testing.assert_close(out.weights, weights.reshape(out.weights.shape).float(), atol=0, rtol=0)
    frame = insp.route(PROMPT)
    assert len(frame) == ids.shape[1] * len(insp.loaded.routers) * insp.loaded.routers[0].top_k
