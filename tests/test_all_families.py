"""Every MoE causal-LM family transformers registers: hooks find the routers and read them right.

Each family is built tiny from its config class (selection biases set non-zero), saved with a tokenizer,
and loaded back through moe-inspect's own loader. Token by token we check that the captured logits are
what ``output_router_logits`` records, that the captured experts are what the experts module received,
that pads are excluded, that no hook outlives a capture, and that ``route --csv`` agrees with the capture.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
from tiny_models import SKIPPED, moe_families
from torch import nn
from typer.testing import CliRunner

from moe_inspect.accumulate import BalanceAccumulator
from moe_inspect.capture import RouterOutput, capture
from moe_inspect.cli import app
from moe_inspect.loading import LoadedModel, load
from moe_inspect.options import LoadOptions
from moe_inspect.routers import RouterSpec

FAMILIES = moe_families()
TEXTS = ["def add(a, b): return a + b", "The quick brown fox"]


def _experts_owner(model: nn.Module, spec: RouterSpec) -> nn.Module | None:
    """The nearest module above the router that holds the routed experts."""
    parts = spec.path.split(".")
    for end in range(len(parts) - 1, 0, -1):
        owner = model.get_submodule(".".join(parts[:end]))
        if isinstance(getattr(owner, "experts", None), nn.Module):
            return owner.experts
    return None


def _received(loaded: LoadedModel, batch: dict[str, torch.Tensor]) -> tuple[list[torch.Tensor], list[RouterOutput]]:
    """Run one forward, recording what each router's experts received, and capturing with moe-inspect."""
    received: dict[int, torch.Tensor] = {}
    handles = []
    for spec in loaded.routers:
        if spec.parser == "doge":
            target = spec.module.down_embed
            handles.append(target.register_forward_pre_hook(lambda _m, a, i=spec.index: received.__setitem__(i, a[0])))
        elif spec.parser == "jetmoe":
            def gating_truth(_m, _a, out, i=spec.index):
                # independent of moe-inspect's unsorting: tokens per expert from batch_index and expert_size
                _idx, batch_index, _gates, expert_size, logits = out
                sets: list[set[int]] = [set() for _ in range(logits.shape[0])]
                start = 0
                for expert, size in enumerate(expert_size):
                    for token in batch_index[start : start + size].tolist():
                        sets[token].add(expert)
                    start += size
                received[i] = sets

            handles.append(spec.module.register_forward_hook(gating_truth))
        elif spec.parser == "llama4":
            handles.append(
                spec.module.register_forward_hook(lambda _m, _a, out, i=spec.index: received.__setitem__(i, out[0]))
            )
        else:
            owner = _experts_owner(loaded.model, spec)
            assert owner is not None, f"no experts module found above {spec.path}"

            def pre(_m, args, kwargs, i=spec.index):
                received[i] = kwargs.get("top_k_index", args[1] if len(args) > 1 else None)

            handles.append(owner.register_forward_pre_hook(pre, with_kwargs=True))
    try:
        with torch.inference_mode(), capture(loaded.routers) as cap:
            out = loaded.model(**batch, output_router_logits=True)
    finally:
        for handle in handles:
            handle.remove()
    recorded = [t.float() for t in (out.router_logits or ())]
    return recorded, [calls[0] for calls in cap.calls], received


def _hooks(model: nn.Module) -> list[tuple[str, int, int]]:
    return [(n, len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules()]


@pytest.fixture(scope="module")
def loaded_family(tiny_dir):
    cache: dict[str, LoadedModel] = {}

    def get(model_type: str) -> LoadedModel:
        if model_type not in cache:
            cache.clear()  # one family in memory at a time
            cache[model_type] = load(LoadOptions(str(tiny_dir(model_type))))
        return cache[model_type]

    return get


def test_every_registered_family_is_covered() -> None:
    assert len(FAMILIES) >= 50, FAMILIES
    for name in ("mixtral", "qwen3_moe", "deepseek_v3", "olmoe", "gpt_oss", "dbrx", "jetmoe", "doge"):
        assert name in FAMILIES


@pytest.mark.parametrize("model_type", FAMILIES)
def test_capture_matches_the_model(model_type: str, loaded_family) -> None:
    if model_type in SKIPPED:
        pytest.skip(SKIPPED[model_type])
    loaded = loaded_family(model_type)
    assert loaded.routers, "no router found"
    tokenizer = loaded.tokenizer
    tokenizer.padding_side = "right"
    batch = dict(tokenizer(TEXTS, return_tensors="pt", padding=True))
    mask = batch["attention_mask"].reshape(-1).bool()
    assert not mask.all(), "the batch must contain pads"

    before = _hooks(loaded.model)
    recorded, captured, received = _received(loaded, batch)
    with torch.inference_mode():  # transformers installs its own recorder hooks lazily, once
        loaded.model(**batch, output_router_logits=True)
    before = _hooks(loaded.model)
    recorded, captured, received = _received(loaded, batch)
    assert _hooks(loaded.model) == before, "a hook outlived the capture"

    # 1. captured logits are exactly what output_router_logits records (hash routers are not recorded)
    for tensor in recorded:
        assert any(c.logits.shape == tensor.shape and torch.equal(c.logits, tensor) for c in captured)
    for spec, out in zip(loaded.routers, captured, strict=True):
        if spec.selection != "hash":
            assert any(out.logits.shape == t.shape and torch.equal(out.logits, t) for t in recorded), spec.path

    # 2. captured experts are what the experts module received, token by token
    for spec, out in zip(loaded.routers, captured, strict=True):
        truth = received[spec.index]
        assert out.experts.shape == (mask.numel(), spec.top_k), spec.path
        if spec.parser == "jetmoe":
            assert [set(row) for row in out.experts.tolist()] == truth
        elif spec.parser == "llama4":
            assert [set(row) for row in out.experts.tolist()] == [
                set(torch.nonzero(row > 0).flatten().tolist()) for row in truth
            ]
        elif spec.parser == "zaya":
            skip = out.experts == spec.num_experts
            assert torch.equal(torch.where(skip, 0, out.experts), truth.long())
            assert torch.all(out.weights[skip] == 0)
        else:
            assert torch.equal(out.experts, truth.reshape(out.experts.shape).long()), spec.path
        assert torch.isfinite(out.weights).all()
        assert int(out.experts.max()) < spec.num_columns

    # 3. pads are excluded: the accumulator counts exactly the real rows
    accumulator = BalanceAccumulator(loaded.routers)
    accumulator.begin_batch(batch["attention_mask"])
    for spec, out in zip(loaded.routers, captured, strict=True):
        accumulator(spec, out)
    for totals, out in zip(accumulator.finish(), captured, strict=True):
        real = out.experts[mask]
        expected = torch.bincount(real.reshape(-1), minlength=totals.spec.num_columns).numpy()
        assert (totals.count == expected).all()
        assert totals.tokens == int(mask.sum())
        assert totals.count.sum() == int(mask.sum()) * totals.spec.top_k

    # probabilities are a distribution under the family's own scoring
    for spec, out in zip(loaded.routers, captured, strict=True):
        probs = out.probabilities(spec)
        assert probs.shape == (mask.numel(), spec.num_columns)
        torch.testing.assert_close(probs.sum(-1), torch.ones(mask.numel()), atol=1e-4, rtol=0)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_route_csv_agrees_with_capture(model_type: str, tiny_dir, loaded_family, tmp_path: Path) -> None:
    if model_type in SKIPPED:
        pytest.skip(SKIPPED[model_type])
    csv = tmp_path / "route.csv"
    result = CliRunner().invoke(app, ["route", TEXTS[0], "-m", str(tiny_dir(model_type)), "--csv", str(csv)])
    assert result.exit_code == 0, result.output
    assert "MoE routers" in result.output
    frame = pd.read_csv(csv, keep_default_na=False)
    assert list(frame.columns[:9]) == [
        "position", "token_id", "token", "layer", "rank", "expert", "weight", "probability", "router_entropy",
    ]
    loaded = loaded_family(model_type)
    ids = loaded.tokenizer(TEXTS[0], return_tensors="pt")["input_ids"]
    with torch.inference_mode(), capture(loaded.routers) as cap:
        loaded.model(input_ids=ids)
    assert sorted(frame["position"].unique()) == list(range(ids.shape[1]))
    assert frame.drop_duplicates("position")["token_id"].tolist() == ids[0].tolist()
    for spec, calls in zip(loaded.routers, cap.calls, strict=True):
        rows = frame[(frame["layer"] == spec.layer) & (frame["router"] == spec.kind)].sort_values(["position", "rank"])
        out = calls[0]
        assert rows["expert"].to_numpy().reshape(-1, spec.top_k).tolist() == out.experts.tolist()
        assert rows["weight"].to_numpy().reshape(-1, spec.top_k) == pytest.approx(out.weights.numpy(), abs=1e-6)
        probs = out.probabilities(spec).gather(1, out.experts).numpy()
        assert rows["probability"].to_numpy().reshape(-1, spec.top_k) == pytest.approx(probs, abs=1e-6)
        assert rows["router_entropy"].between(0, 1 + 1e-6).all()
