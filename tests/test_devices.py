"""Routers on different devices: each router's sums live on its own device, the mask is copied once per device.

No machine here has two accelerators, so the second device is PyTorch's shape-only ``meta`` device: every
accumulator op runs on it, which is what placement across devices needs (no op may pull tensors together).
"""

from __future__ import annotations

import torch

from moe_inspect.analysis.accumulate import BalanceAccumulator
from moe_inspect.model.capture import RouterOutput
from moe_inspect.model.routers import RouterSpec


def _spec(index: int) -> RouterSpec:
    return RouterSpec(
        index=index, layer=index, path=f"model.layers.{index}.mlp.gate", kind="mlp", model_type="mixtral",
        router_class="MixtralTopKRouter", num_experts=8, top_k=2, null_experts=0, null_label="null",
        scoring="softmax", parser="tuple", logits_index=0, selection="top-k", shared_experts=0,
    )


def _output(device: str, tokens: int, generator: torch.Generator) -> RouterOutput:
    logits = torch.randn(tokens, 8, generator=generator).to(device)
    weights, experts = torch.softmax(logits, -1).topk(2)
    return RouterOutput(logits=logits, experts=experts, weights=weights)


def test_each_router_accumulates_on_its_own_device() -> None:
    routers = [_spec(0), _spec(1), _spec(2)]
    accumulator = BalanceAccumulator(routers)
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, :2] = 0  # left padding
    real = mask.reshape(-1).bool()
    generator = torch.Generator().manual_seed(0)
    count = torch.zeros(8, dtype=torch.long)
    first = torch.zeros(8, dtype=torch.long)
    for _ in range(2):
        accumulator.begin_batch(mask)
        cpu = _output("cpu", 12, generator)
        accumulator(routers[0], cpu)
        accumulator(routers[1], _output("meta", 12, generator))
        meta_mask = accumulator._masks[("decoder", torch.device("meta"))]
        accumulator(routers[2], _output("meta", 12, generator))
        accumulator.end_batch()
        assert accumulator._masks[("decoder", torch.device("meta"))] is meta_mask  # one copy per device and batch
        assert set(accumulator._masks) == {("decoder", torch.device("cpu")), ("decoder", torch.device("meta"))}
        count += torch.bincount(cpu.experts[real].reshape(-1), minlength=8)
        first += torch.bincount(cpu.experts[real][:, 0], minlength=8)
    states = accumulator._states
    assert states[0].count.device.type == "cpu"
    for state in (states[1], states[2]):
        tensors = (state.count, state.first, state.coact, state.scalars, state.repeats, state.dropped, state.prob_sum)
        assert {t.device.type for t in tensors} == {"meta"}
    # the CPU router's sums are right although its neighbours live elsewhere: 2 batches x 10 real tokens
    assert [state.tokens for state in states.values()] == [20, 20, 20]
    assert torch.equal(states[0].count, count) and int(count.sum()) == 2 * 10 * 2
    assert torch.equal(states[0].first, first)
