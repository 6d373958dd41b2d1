"""Every MoE causal-LM family transformers registers: hooks find the routers and read them right.

Each family is built tiny from its config class (selection biases set non-zero), saved with a tokenizer,
and loaded back through moe-inspect's own loader. Token by token we check that the captured logits are
what ``output_router_logits`` records, that the captured experts are what the experts module received,
that pads are excluded, that no hook outlives a capture, and that ``route --csv`` agrees with the capture.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from experts_truth import experts_module
from safetensors.torch import load_file
from tiny_models import SELECTION_BIAS_NAME, moe_families
from torch import nn
from typer.testing import CliRunner

from moe_inspect.analysis.accumulate import BalanceAccumulator
from moe_inspect.cli import app
from moe_inspect.model.capture import RouterOutput, capture
from moe_inspect.model.loading import LoadedModel, load
from moe_inspect.model.options import LoadOptions

FAMILIES = moe_families()
TEXTS = ["def add(a, b): return a + b", "The quick brown fox"]


def _received(
    loaded: LoadedModel, batch: dict[str, torch.Tensor]
) -> tuple[list[torch.Tensor], list[RouterOutput], dict[int, object], dict[int, object]]:
    """Run one forward, recording what each router's experts received (ids and weights), and capturing."""
    received: dict[int, object] = {}
    received_weights: dict[int, object] = {}
    handles = []
    for spec in loaded.routers:
        if spec.parser == "doge":  # Doge's weights multiply an activation inside its forward: ids only
            target = spec.module.down_embed
            handles.append(target.register_forward_pre_hook(lambda _m, a, i=spec.index: received.__setitem__(i, a[0])))
        elif spec.parser == "jetmoe":
            def gating_truth(_m, _a, out, i=spec.index):
                # independent of moe-inspect's unsorting: tokens per expert from batch_index and expert_size
                _idx, batch_index, gates, expert_size, logits = out
                sets: list[set[int]] = [set() for _ in range(logits.shape[0])]
                weights: list[dict[int, float]] = [{} for _ in range(logits.shape[0])]
                start = 0
                for expert, size in enumerate(expert_size):
                    for token, gate in zip(
                        batch_index[start : start + size].tolist(), gates[start : start + size].tolist(), strict=True
                    ):
                        sets[token].add(expert)
                        weights[token][expert] = gate
                    start += size
                received[i] = sets
                received_weights[i] = weights

            handles.append(spec.module.register_forward_hook(gating_truth))
        elif spec.parser == "llama4":
            def scores_truth(_m, _a, out, i=spec.index):
                received[i] = out[0]  # (T, E) scores, non-zero exactly at the chosen experts
                received_weights[i] = out[0]

            handles.append(spec.module.register_forward_hook(scores_truth))
        else:
            owner = experts_module(loaded.model, spec.path)
            assert owner is not None, f"no experts module found above {spec.path}"

            def pre(_m, args, kwargs, i=spec.index):
                received[i] = kwargs.get("top_k_index", args[1] if len(args) > 1 else None)
                received_weights[i] = kwargs.get("top_k_weights", args[2] if len(args) > 2 else None)

            handles.append(owner.register_forward_pre_hook(pre, with_kwargs=True))
    try:
        with torch.inference_mode(), capture(loaded.routers) as cap:
            out = loaded.model(**batch, output_router_logits=True)
    finally:
        for handle in handles:
            handle.remove()
    recorded = [t.float() for t in (out.router_logits or ())]
    return recorded, [calls[0] for calls in cap.calls], received, received_weights


def _distribution(logits: torch.Tensor, scoring: str) -> torch.Tensor:
    """The family's routing distribution computed here, in float64, from the README's definitions."""
    x = logits.double()
    if scoring == "softmax":
        return torch.exp(x - torch.logsumexp(x, -1, keepdim=True))
    if scoring == "probabilities":
        return x
    if scoring == "product_key":  # Doge: softmax over every (x, y) key pair's score sum
        pairs = (x[0].unsqueeze(-1) + x[1].unsqueeze(-2)).reshape(x.shape[1], -1)
        return torch.exp(pairs - torch.logsumexp(pairs, -1, keepdim=True))
    scores = 1 / (1 + torch.exp(-x)) if scoring == "sigmoid" else torch.log1p(torch.exp(x)).sqrt()
    assert scoring in ("sigmoid", "sqrtsoftplus"), scoring
    return scores / scores.sum(-1, keepdim=True)


def _entropy(probs: torch.Tensor) -> torch.Tensor:
    """-sum p log p / log C per row (0 log 0 = 0)."""
    terms = torch.where(probs > 0, -probs * torch.log(probs.clamp_min(1e-300)), torch.zeros_like(probs))
    return terms.sum(-1) / math.log(probs.shape[-1])


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


def _selection_biases_survived(loaded: LoadedModel, folder: Path) -> None:
    """Selection biases (and hash tables) as loaded are the non-zero values the factory saved: zero biases
    would hide parsers that ignore them, and a family whose init overwrote them on load would test nothing."""
    saved = load_file(folder / "model.safetensors")
    state = loaded.model.state_dict()
    for name, tensor in state.items():
        if SELECTION_BIAS_NAME.search(name) or name.endswith("tid2eid"):
            # some families rename on save (conversion mappings), so match by value: random, non-zero values
            assert any(t.shape == tensor.shape and torch.equal(t, tensor) for t in saved.values()), f"{name} changed"
            assert bool(tensor.ne(0).any()), f"{name} is all zeros"


@pytest.mark.parametrize("model_type", FAMILIES)
def test_capture_matches_the_model(model_type: str, loaded_family, tiny_dir) -> None:
    loaded = loaded_family(model_type)
    assert loaded.routers, "no router found"
    _selection_biases_survived(loaded, tiny_dir(model_type))
    tokenizer = loaded.tokenizer
    side = tokenizer.padding_side
    with torch.inference_mode():  # transformers installs its own recorder hooks lazily, once
        loaded.model(**tokenizer(TEXTS[:1], return_tensors="pt"), output_router_logits=True)
    try:
        for padding_side in ("right", "left"):
            tokenizer.padding_side = padding_side
            _check_capture(loaded, dict(tokenizer(TEXTS, return_tensors="pt", padding=True)), padding_side)
    finally:
        tokenizer.padding_side = side


def _check_capture(loaded: LoadedModel, batch: dict[str, torch.Tensor], padding_side: str) -> None:
    mask = batch["attention_mask"].reshape(-1).bool()
    pad_column = 0 if padding_side == "left" else -1
    assert int(batch["attention_mask"][:, pad_column].min()) == 0, "the batch must contain pads on that side"

    before = _hooks(loaded.model)
    recorded, captured, received, received_weights = _received(loaded, batch)
    assert _hooks(loaded.model) == before, "a hook outlived the capture"

    # 1. captured logits are exactly what output_router_logits records (hash routers are not recorded)
    for tensor in recorded:
        assert any(c.logits.shape == tensor.shape and torch.equal(c.logits, tensor) for c in captured)
    for spec, out in zip(loaded.routers, captured, strict=True):
        if spec.selection != "hash":
            assert any(out.logits.shape == t.shape and torch.equal(out.logits, t) for t in recorded), spec.path

    # 2. captured experts and combine weights are what the experts module received, token by token
    for spec, out in zip(loaded.routers, captured, strict=True):
        truth = received[spec.index]
        weights = received_weights.get(spec.index)
        assert out.experts.shape == (mask.numel(), spec.top_k), spec.path
        if spec.parser == "jetmoe":
            assert [set(row) for row in out.experts.tolist()] == truth
            rows = zip(out.experts.tolist(), out.weights.tolist(), strict=True)
            for (ids, gates), want in zip(rows, weights, strict=True):
                row = dict(zip(ids, gates, strict=True))
                assert row == pytest.approx(want, abs=1e-6)
        elif spec.parser == "llama4":
            assert [set(row) for row in out.experts.tolist()] == [
                set(torch.nonzero(row > 0).flatten().tolist()) for row in truth
            ]
            torch.testing.assert_close(out.weights, weights.float().gather(1, out.experts), atol=0, rtol=0)
        elif spec.parser == "zaya":
            skip = out.experts == spec.num_experts
            assert torch.equal(torch.where(skip, 0, out.experts), truth.long())
            assert torch.all(out.weights[skip] == 0)
            torch.testing.assert_close(out.weights, weights.reshape(out.weights.shape).float(), atol=0, rtol=0)
        else:
            assert torch.equal(out.experts, truth.reshape(out.experts.shape).long()), spec.path
            if spec.parser != "doge":
                want = weights.reshape(out.weights.shape).float()
                torch.testing.assert_close(out.weights, want, atol=0, rtol=0, msg=spec.path)
        assert int(out.experts.max()) < spec.num_columns

    # 3. pads are excluded: the accumulator counts exactly the real rows
    accumulator = BalanceAccumulator(loaded.routers)
    accumulator.begin_batch(batch["attention_mask"])
    for spec, out in zip(loaded.routers, captured, strict=True):
        accumulator(spec, out)
    accumulator.end_batch()
    for totals, out in zip(accumulator.finish(), captured, strict=True):
        real = out.experts[mask]
        expected = torch.bincount(real.reshape(-1), minlength=totals.spec.num_columns).numpy()
        assert (totals.count == expected).all()
        assert totals.tokens == int(mask.sum())
        assert totals.count.sum() == int(mask.sum()) * totals.spec.top_k

    # probabilities are the family's own distribution, computed here from the logits
    for spec, out in zip(loaded.routers, captured, strict=True):
        probs = out.probabilities(spec)
        assert probs.shape == (mask.numel(), spec.num_columns)
        torch.testing.assert_close(probs.double(), _distribution(out.logits, spec.scoring), atol=1e-6, rtol=0)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_route_csv_agrees_with_capture(model_type: str, tiny_dir, loaded_family, tmp_path: Path) -> None:
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
        direct = _distribution(out.logits, spec.scoring)  # not the library's function
        probs = direct.gather(1, out.experts).numpy()
        assert rows["probability"].to_numpy().reshape(-1, spec.top_k) == pytest.approx(probs, abs=1e-6)
        entropy = _entropy(direct).numpy()
        assert rows["router_entropy"].to_numpy().reshape(-1, spec.top_k) == pytest.approx(
            np.repeat(entropy[:, None], spec.top_k, axis=1), abs=1e-6
        )
        assert rows["router_entropy"].std() > 0  # tokens differ: a constant column would be a bug
