"""Routing during generation, and the Python API returning exactly what the CSV files hold."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from cli_checks import assert_no_exception
from typer.testing import CliRunner

import moe_inspect
from moe_inspect.analysis.tables import concat_calls
from moe_inspect.cli import app
from moe_inspect.io import schemas
from moe_inspect.model.capture import capture

PROMPT = "def add(a, b): return a + b"


@pytest.fixture(scope="module")
def insp(tiny_inspector) -> moe_inspect.Inspector:
    return tiny_inspector("mixtral")


def test_generation_rows_are_prompt_plus_n(insp: moe_inspect.Inspector) -> None:
    n = 6
    frame = insp.route(PROMPT, generate=n)
    prompt_len = frame.attrs["prompt_tokens"]
    k = insp.loaded.routers[0].top_k
    per_layer = frame.groupby("layer")["position"].nunique()
    assert (per_layer == prompt_len + n).all()
    assert len(frame) == len(insp.loaded.routers) * (prompt_len + n) * k
    phases = frame.drop_duplicates("position")["phase"].tolist()
    assert phases == ["prefill"] * prompt_len + ["decode"] * n
    generated_ids = frame.drop_duplicates("position")["token_id"].tolist()[prompt_len:]
    assert frame.attrs["generated_text"] == insp.tokenizer.decode(generated_ids)


def test_decode_rows_match_a_full_forward(insp: moe_inspect.Inspector) -> None:
    """Cached step-by-step decoding routes each new token as a plain forward over the whole sequence does."""
    frame = insp.route(PROMPT, generate=5)
    ids = torch.tensor([frame.drop_duplicates("position")["token_id"].tolist()])
    with torch.inference_mode(), capture(insp.loaded.routers) as cap:
        insp.model(input_ids=ids)
    for spec, calls in zip(insp.loaded.routers, cap.calls, strict=True):
        full = concat_calls(calls)
        got = frame[frame["layer"] == spec.layer].sort_values(["position", "rank"])
        k = spec.top_k
        assert got["expert"].to_numpy().reshape(-1, k).tolist() == full.experts.tolist()
        assert got["weight"].to_numpy().reshape(-1, k) == pytest.approx(full.weights.numpy(), abs=1e-5)


def _generated(frame: pd.DataFrame) -> list[int]:
    tokens = frame.drop_duplicates("position")
    return tokens[tokens["phase"] == "decode"]["token_id"].tolist()


def test_sampling_is_seeded(insp: moe_inspect.Inspector) -> None:
    a = insp.route(PROMPT, generate=8, temperature=1.5, seed=3)
    b = insp.route(PROMPT, generate=8, temperature=1.5, seed=3)
    pd.testing.assert_frame_equal(a, b)
    # ... and really sampled: not the greedy tokens, and another seed gives others
    greedy = insp.route(PROMPT, generate=8)
    assert _generated(a) != _generated(greedy)
    assert _generated(a) != _generated(insp.route(PROMPT, generate=8, temperature=1.5, seed=4))
    assert _generated(greedy) == _generated(insp.route(PROMPT, generate=8, seed=4))  # greedy ignores the seed


def test_temperature_and_seed_through_the_cli(insp: moe_inspect.Inspector, tiny_dir, tmp_path: Path) -> None:
    """`route --generate N --temperature T --seed S` writes what the API returns for the same arguments."""
    out = tmp_path / "sampled.csv"
    args = ["route", PROMPT, "-m", str(tiny_dir("mixtral")), "--generate", "6", "--csv", str(out), "-q"]
    result = CliRunner().invoke(app, [*args, "--temperature", "1.5", "--seed", "7"])
    assert_no_exception(result)
    from_csv = pd.read_csv(out, keep_default_na=False).astype(schemas.ROUTE.dtypes)
    api = insp.route(PROMPT, generate=6, temperature=1.5, seed=7)
    pd.testing.assert_frame_equal(from_csv, api, check_exact=False, rtol=1e-6)
    assert _generated(from_csv) != _generated(insp.route(PROMPT, generate=6))


def test_api_route_equals_csv(insp: moe_inspect.Inspector, tiny_dir, tmp_path: Path) -> None:
    out = tmp_path / "route.csv"
    result = CliRunner().invoke(
        app, ["route", PROMPT, "-m", str(tiny_dir("mixtral")), "--csv", str(out), "--generate", "3", "-q"]
    )
    assert result.exit_code == 0, result.output
    from_csv = pd.read_csv(out, keep_default_na=False).astype(schemas.ROUTE.dtypes)
    frame = insp.route(PROMPT, generate=3)
    assert list(from_csv.columns) == schemas.ROUTE.names
    assert list(from_csv.columns[:9]) == [
        "position", "token_id", "token", "layer", "rank", "expert", "weight", "probability", "router_entropy",
    ]
    pd.testing.assert_frame_equal(from_csv, frame, check_exact=False, rtol=1e-6)


def test_api_balance_equals_files(insp: moe_inspect.Inspector, tiny_dir, tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"def f{i}(x): return x * {i}  # the quick brown fox" for i in range(60)))
    result = CliRunner().invoke(
        app, ["balance", str(corpus), "-m", str(tiny_dir("mixtral")), "--seq-len", "32", "--out", str(tmp_path / "o")]
    )
    assert result.exit_code == 0, result.output
    report = insp.balance(files=[corpus], seq_len=32)
    for name in ("layers", "experts", "coactivation"):
        from_csv = pd.read_csv(tmp_path / "o" / f"{name}.csv")
        pd.testing.assert_frame_equal(from_csv, getattr(report, name), check_exact=False, rtol=1e-9, check_dtype=False)
    run = json.loads((tmp_path / "o" / "run.json").read_text())
    assert run["tokens"] == report.run["tokens"] == int(report.layers["tokens"].iloc[0])


def test_api_routers_frame(insp: moe_inspect.Inspector) -> None:
    routers = insp.routers
    assert list(routers.columns) == schemas.ROUTERS.names
    assert routers["layer"].tolist() == [spec.layer for spec in insp.loaded.routers]
    assert set(routers["experts"]) == {insp.model.config.num_local_experts}
    assert set(routers["top_k"]) == {insp.model.config.num_experts_per_tok}
    assert routers["path"].str.endswith("mlp.gate").all()


def test_layers_filter(insp: moe_inspect.Inspector) -> None:
    layer = insp.loaded.routers[-1].layer
    frame = insp.route(PROMPT, layers=[layer])
    assert set(frame["layer"]) == {layer}


def test_device_map_auto_loads_and_routes(tiny_dir, tiny_inspector) -> None:
    """accelerate placement (all on the CPU here) keeps capture working: the same frames as a plain load."""
    insp = moe_inspect.load(str(tiny_dir("qwen3_moe")), device_map="auto")
    plain = tiny_inspector("qwen3_moe")
    assert insp.loaded.device == "auto"
    assert [spec.path for spec in insp.loaded.routers] == [spec.path for spec in plain.loaded.routers]
    frame = insp.route(PROMPT)
    assert set(frame["layer"]) == {spec.layer for spec in insp.loaded.routers} == {1, 2}
    pd.testing.assert_frame_equal(frame, plain.route(PROMPT))
    report = insp.balance(PROMPT * 20, seq_len=16)
    want = plain.balance(PROMPT * 20, seq_len=16)
    assert int(report.layers["tokens"].iloc[0]) == report.run["tokens"] == want.run["tokens"] > 0
    for name in ("layers", "experts", "coactivation"):
        pd.testing.assert_frame_equal(getattr(report, name), getattr(want, name))
