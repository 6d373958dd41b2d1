"""Encoder-decoder MoE routing (issue 17): Switch Transformers and NLLB-MoE, with the drops their capacity makes.

Tiny checkpoints (tests/tiny_seq2seq_vl.py) have capacities small enough that one sentence overflows an expert.
Captured experts are checked against what each experts module received, and drops against the capacity rule
recomputed here from the router's logits.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest
import torch
from experts_truth import experts_module
from tiny_seq2seq_vl import NLLB_CAPACITY_FRACTION, SWITCH_CAPACITY, save
from typer.testing import CliRunner

from moe_inspect.cli import app
from moe_inspect.errors import UserError
from moe_inspect.model.capture import capture

SOURCE = "The quick brown fox jumps over the lazy dog again and again"
TARGET = "The fox"


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("seq2seq")
    return {name: save(name, root / name) for name in ("switch_transformers", "nllb-moe")}


@pytest.fixture(scope="module")
def inspectors(folders):
    import moe_inspect

    return {name: moe_inspect.load(str(path), device="cpu") for name, path in folders.items()}


def _forward(insp, source: str = SOURCE, target: str = TARGET):
    """One forward; returns (capture calls, what each experts module received) per router."""
    loaded = insp.loaded
    received: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    handles = []
    for spec in loaded.routers:
        owner = experts_module(loaded.model, spec.path)
        assert owner is not None
        handles.append(owner.register_forward_pre_hook(lambda _m, a, i=spec.index: received.__setitem__(i, a[1:3])))
    tok = insp.tokenizer
    ids = torch.tensor([tok(source)["input_ids"]])
    dec = torch.tensor([[loaded.model.config.decoder_start_token_id, *tok(target)["input_ids"]]])
    try:
        with torch.inference_mode(), capture(loaded.routers) as cap:
            loaded.model(input_ids=ids, decoder_input_ids=dec)
    finally:
        for handle in handles:
            handle.remove()
    return [calls[0] for calls in cap.calls], received, ids, dec


def test_stacks_and_capacity_notes(inspectors) -> None:
    switch, nllb = inspectors["switch_transformers"].loaded, inspectors["nllb-moe"].loaded
    assert [(s.stack, s.layer, s.top_k, s.num_experts) for s in switch.routers] == [
        ("encoder", 1, 1, 8), ("decoder", 1, 1, 8),
    ]
    assert [(s.stack, s.layer, s.top_k, s.num_experts) for s in nllb.routers] == [
        ("encoder", 1, 2, 8), ("decoder", 1, 2, 8),
    ]
    assert switch.notes[0] == "Routing the encoder and decoder stacks."
    assert f"at most {SWITCH_CAPACITY} tokens per expert per sequence" in switch.notes[1]
    assert nllb.notes[2] == "Second-expert policy 'all': every token also goes to its second expert."


def test_switch_capture_and_drops_match_the_router(inspectors) -> None:
    captured, received, ids, dec = _forward(inspectors["switch_transformers"])
    for out, spec, tokens in zip(captured, inspectors["switch_transformers"].loaded.routers, (ids, dec), strict=True):
        mask, weights = received[spec.index]  # (T, 1, E) dispatch mask after capacity, (T, 1) weights
        mask = mask.reshape(-1, spec.num_experts)
        kept = mask.sum(-1) > 0
        assert torch.equal(out.dropped[:, 0], ~kept)
        assert torch.equal(out.experts[kept, 0], mask[kept].argmax(-1))
        torch.testing.assert_close(out.weights, weights.reshape(-1, 1).float())
        # the capacity rule by hand: the n-th token (in order) choosing expert e is dropped when n > capacity
        choice = out.logits.argmax(-1).tolist()
        seen = [0] * spec.num_experts
        want = []
        for e in choice:
            seen[e] += 1
            want.append(seen[e] > SWITCH_CAPACITY)
        assert out.dropped[:, 0].tolist() == want
        assert out.experts[:, 0].tolist() == choice
        assert len(choice) == tokens.shape[1]
    assert bool(captured[0].dropped.any()), "the encoder sentence must overflow an expert"


def test_nllb_capture_and_drops_match_the_router(inspectors) -> None:
    insp = inspectors["nllb-moe"]
    captured, received, ids, dec = _forward(insp)
    for out, spec, tokens in zip(captured, insp.loaded.routers, (ids, dec), strict=True):
        top1_mask, gates = received[spec.index]  # what NllbMoeExperts received
        routed = [set(torch.nonzero(row).flatten().tolist()) for row in gates]
        mine = [
            {e for e, d in zip(es, ds, strict=True) if not d}
            for es, ds in zip(out.experts.tolist(), out.dropped.tolist(), strict=True)
        ]
        assert mine == routed
        first = top1_mask.argmax(-1)[top1_mask.sum(-1) > 0]
        assert out.experts[~out.dropped[:, 0], 0].tolist() == first.tolist()
        # the capacity rule by hand (policy 'all', no batch prioritisation): first choices claim slots in token
        # order, then second choices; each expert takes ceil(fraction * tokens) assignments
        capacity = math.ceil(NLLB_CAPACITY_FRACTION * tokens.shape[1])
        firsts, seconds = out.experts[:, 0].tolist(), out.experts[:, 1].tolist()
        slots = [0] * spec.num_experts
        want1 = []
        for e in firsts:
            want1.append(slots[e] >= capacity)
            slots[e] += 1
        want2 = []
        for e in seconds:
            want2.append(slots[e] >= capacity)
            slots[e] += 1
        assert out.dropped[:, 0].tolist() == want1
        assert out.dropped[:, 1].tolist() == want2
        assert bool(out.dropped.any())


def test_route_frame_rows_per_stack(inspectors) -> None:
    insp = inspectors["switch_transformers"]
    captured, _received, ids, dec = _forward(insp)
    frame = insp.route(SOURCE, target=TARGET)
    for out, stack, tokens in zip(captured, ("encoder", "decoder"), (ids, dec), strict=True):
        rows = frame[frame["stack"] == stack]
        assert rows["token_id"].tolist() == tokens[0].tolist()
        assert rows["position"].tolist() == list(range(tokens.shape[1]))
        dropped = out.dropped[:, 0].numpy()
        assert (rows["expert_type"] == "dropped").tolist() == dropped.tolist()
        assert (rows["expert"].to_numpy()[dropped] == -1).all()
        assert (rows["weight"].to_numpy()[dropped] == 0).all()
        assert rows["expert"].to_numpy()[~dropped].tolist() == out.experts[~out.dropped].tolist()
    default = insp.route(SOURCE)
    assert default[default["stack"] == "decoder"]["token_id"].tolist() == [insp.model.config.decoder_start_token_id]


def test_random_policy_is_repeatable_with_a_seed(inspectors) -> None:
    insp = inspectors["nllb-moe"]
    routers = [spec.module for spec in insp.loaded.routers]
    try:
        for router in routers:
            router.second_expert_policy = "random"
        runs = [insp.route(SOURCE, seed=seed)["expert"].tolist() for seed in (1, 1, 2, 3)]
    finally:
        for router in routers:
            router.second_expert_policy = "all"
    assert runs[0] == runs[1]
    assert runs[0] != runs[2] or runs[0] != runs[3]


def test_route_cli_with_target(folders, tmp_path: Path) -> None:
    csv = tmp_path / "route.csv"
    result = CliRunner().invoke(
        app, ["route", SOURCE, "--target", TARGET, "-m", str(folders["nllb-moe"]), "--csv", str(csv)]
    )
    assert result.exit_code == 0, result.output
    assert "Routing the encoder and decoder stacks." in result.output
    assert "Second-expert policy 'all'" in result.output
    assert "encoder" in result.output and "drop" in result.output
    frame = pd.read_csv(csv, keep_default_na=False)
    assert list(dict.fromkeys(frame["stack"])) == ["encoder", "decoder"]
    assert set(frame["expert_type"]) == {"routed", "dropped"}
    assert (frame.loc[frame["expert_type"] == "dropped", "expert"] == -1).all()


def test_a_target_on_a_decoder_only_model_is_refused(inspectors) -> None:
    with pytest.raises(UserError, match="only for encoder-decoder"):
        inspectors_decoder_only_target()


def inspectors_decoder_only_target() -> None:
    import moe_inspect
    from moe_inspect.model.source import demo_model_path

    moe_inspect.load(str(demo_model_path())).route("hi", target="there")
