"""Routers on different devices: each router's sums live on its own device, the mask is copied once per device.

No machine here has two accelerators, so the second device is PyTorch's shape-only ``meta`` device: every
accumulator op runs on it, which is what placement across devices needs (no op may pull tensors together).
"""

from __future__ import annotations

import torch

from moe_inspect.accumulate import BalanceAccumulator
from moe_inspect.capture import RouterOutput
from moe_inspect.routers import RouterSpec


def _spec(index: int) -> RouterSpec:
    return RouterSpec(
        index=index, layer=index, path=f"model.layers.{index}.mlp.gate", kind="mlp", model_type="mixtral",
        router_class="MixtralTopKRouter", num_experts=8, top_k=2, null_experts=0, null_label="null",
        scoring="softmax", parser="tuple", logits_index=0, selection="top-k", shared_experts=0,
    )


def _output(device: str, tokens: int) -> RouterOutput:
    logits = torch.randn(tokens, 8, device=device)
    weights, experts = torch.softmax(logits, -1).topk(2)
    return RouterOutput(logits=logits, experts=experts, weights=weights)


def test_each_router_accumulates_on_its_own_device() -> None:
    routers = [_spec(0), _spec(1)]
    accumulator = BalanceAccumulator(routers)
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, :2] = 0  # left padding
    for _ in range(2):
        accumulator.begin_batch(mask)
        accumulator(routers[0], _output("cpu", 12))
        accumulator(routers[1], _output("meta", 12))
    states = accumulator._states
    assert states[0].count.device.type == "cpu"
    assert {t.device.type for t in (states[1].count, states[1].coact, states[1].scalars, states[1].dropped)} == {
        "meta"
    }
    assert set(accumulator._masks) == {torch.device("cpu"), torch.device("meta")}
    assert states[0].tokens == states[1].tokens == 2 * 10
    assert int(states[0].count.sum()) == 2 * 10 * 2
