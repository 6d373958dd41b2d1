"""The routing-only pass captures exactly what a full forward captures, for every family, and skips what it can."""

from __future__ import annotations

import pytest
import torch
from tiny_models import moe_families
from torch import nn

from moe_inspect.analysis.routing_pass import _CALLS_PER_FORWARD, routing_forward
from moe_inspect.model.capture import RouterOutput, capture
from moe_inspect.model.loading import LoadedModel, load
from moe_inspect.model.options import LoadOptions

FAMILIES = moe_families()


def _batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 300, (2, 9), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    return ids, mask, (mask.cumsum(-1) - 1).clamp_min(0)


def _hooks(model: nn.Module) -> list[tuple[str, int, int]]:
    return [(n, len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules()]


def _assert_same(full: list[list[RouterOutput]], fast: list[list[RouterOutput]]) -> None:
    assert [len(c) for c in fast] == [len(c) for c in full]
    for full_calls, fast_calls in zip(full, fast, strict=True):
        for a, b in zip(full_calls, fast_calls, strict=True):
            assert torch.equal(a.logits, b.logits)
            assert torch.equal(a.experts, b.experts)
            assert torch.equal(a.weights, b.weights)
            assert a.hash_selected == b.hash_selected


@pytest.mark.parametrize("model_type", FAMILIES)
def test_routing_pass_equals_full_forward(model_type: str, tiny_inspector) -> None:
    loaded = tiny_inspector(model_type).loaded
    ids, mask, positions = _batch()
    with torch.inference_mode():
        with capture(loaded.routers) as cap:
            loaded.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False)
        full = cap.calls
        head_calls: list[int] = []
        head = loaded.model.get_output_embeddings()
        before = _hooks(loaded.model)
        handle = head.register_forward_hook(lambda *_: head_calls.append(1))
        try:
            for _ in range(2):  # the first pass learns how many router calls a forward makes, the second stops there
                with capture(loaded.routers) as cap:
                    routing_forward(loaded, ids, mask, positions)
                _assert_same(full, cap.calls)
        finally:
            handle.remove()
    assert head_calls == [], "the LM head ran"
    assert _hooks(loaded.model) == before, "a hook outlived the pass"
    assert _CALLS_PER_FORWARD[loaded.model][tuple(s.path for s in loaded.routers)] == sum(len(c) for c in full)


@pytest.fixture(scope="module")
def dense_tail(tmp_path_factory) -> LoadedModel:
    """Qwen2-MoE whose last two of four layers are dense: the pass must stop before them."""
    from tiny_models import tiny_config, train_tiny_tokenizer
    from transformers import AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("dense_tail")
    torch.manual_seed(0)
    config = tiny_config("qwen2_moe", num_hidden_layers=4, mlp_only_layers=[2, 3])
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    train_tiny_tokenizer().save_pretrained(folder)
    return load(LoadOptions(model=str(folder)))


def test_the_pass_stops_after_the_last_router(dense_tail: LoadedModel) -> None:
    loaded = dense_tail
    assert [spec.layer for spec in loaded.routers] == [0, 1]
    layers = loaded.model.model.layers
    ran: list[int] = []
    handles = [layer.register_forward_pre_hook(lambda *_a, i=i: ran.append(i)) for i, layer in enumerate(layers)]
    ids, mask, positions = _batch()
    try:
        with torch.inference_mode():
            with capture(loaded.routers) as cap:
                loaded.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False)
            full = cap.calls
            for expected in ([0, 1, 2, 3], [0, 1]):  # first pass learns, the next stops inside layer 1
                ran.clear()
                with capture(loaded.routers) as cap:
                    routing_forward(loaded, ids, mask, positions)
                assert ran == expected
                _assert_same(full, cap.calls)
    finally:
        for handle in handles:
            handle.remove()


def test_hooks_are_removed_when_the_forward_fails(dense_tail: LoadedModel) -> None:
    before = _hooks(dense_tail.model)
    with pytest.raises(IndexError), torch.inference_mode():
        routing_forward(dense_tail, torch.tensor([[10**6]]))  # id outside the vocabulary
    assert _hooks(dense_tail.model) == before
