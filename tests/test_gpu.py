"""GPU checks: capture and accumulation stay on the device without host syncs. Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch

import moe_inspect
from moe_inspect.accumulate import BalanceAccumulator
from moe_inspect.capture import capture

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

TEXT = "\n".join(f"def f{i}(x):\n    return x * {i} + {i % 7}  # the quick brown fox" for i in range(80))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_balance_on_cuda_matches_cpu(tiny_dir, dtype: str) -> None:
    path = str(tiny_dir("deepseek_v3"))
    cpu = moe_inspect.load(path, device="cpu", dtype=dtype).balance(TEXT, seq_len=32, batch_size=4)
    gpu = moe_inspect.load(path, device="cuda", dtype=dtype).balance(TEXT, seq_len=32, batch_size=4)
    assert gpu.run["device"] == "cuda"
    assert (gpu.experts["count"].to_numpy() == cpu.experts["count"].to_numpy()).mean() > 0.95
    assert gpu.layers["tokens"].tolist() == cpu.layers["tokens"].tolist()


def test_accumulator_does_not_sync_with_the_host(tiny_dir) -> None:
    """The model's own forward may sync; what moe-inspect adds per router call must not."""
    insp = moe_inspect.load(str(tiny_dir("deepseek_v3")), device="cuda")
    batch = next(insp.corpus(TEXT, seq_len=32, batch_size=4).batches())
    with torch.inference_mode(), capture(insp.loaded.routers) as cap:
        insp.model(input_ids=batch.input_ids.cuda(), attention_mask=batch.attention_mask.cuda())
    accumulator = BalanceAccumulator(insp.loaded.routers)
    accumulator.begin_batch(batch.attention_mask)
    for spec, calls in zip(insp.loaded.routers, cap.calls, strict=True):  # warm-up: state allocation
        accumulator(spec, calls[0])
    accumulator.begin_batch(batch.attention_mask)
    accumulator._mask_on(torch.device("cuda", torch.cuda.current_device()))  # the one copy per batch
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for spec, calls in zip(insp.loaded.routers, cap.calls, strict=True):
            accumulator(spec, calls[0])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    totals = accumulator.finish()
    assert all(t.tokens == 2 * batch.tokens for t in totals)


def test_device_map_auto_on_cuda(tiny_dir) -> None:
    insp = moe_inspect.load(str(tiny_dir("mixtral")), device_map="auto")
    frame = insp.route("def add(a, b): return a + b")
    assert len(frame) > 0
    assert insp.loaded.input_device.type == "cuda"


def test_4bit_on_cuda(tiny_dir) -> None:
    pytest.importorskip("bitsandbytes")
    insp = moe_inspect.load(str(tiny_dir("mixtral")), load_in_4bit=True, device="cuda")
    assert insp.loaded.quantization == "4bit-nf4"
    assert len(insp.route("def add(a, b): return a + b")) > 0
