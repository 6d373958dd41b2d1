"""`balance --top-tokens`: per-expert token counts equal a brute-force count from `route --csv` of the same lines."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from tiny_models import LINES
from typer.testing import CliRunner

import moe_inspect
from moe_inspect import metrics
from moe_inspect.analysis.token_counts import TokenCounter
from moe_inspect.cli import app
from moe_inspect.io import schemas
from moe_inspect.model.capture import capture

runner = CliRunner()


@pytest.fixture(scope="module")
def mixtral_dir(tiny_dir) -> Path:  # type: ignore[no-untyped-def]
    return tiny_dir("mixtral")


@pytest.fixture(scope="module")
def route_rows(mixtral_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> pd.DataFrame:
    """Every line routed on its own through the CLI, read back from its CSV."""
    out = tmp_path_factory.mktemp("routes")
    frames = []
    for i, line in enumerate(LINES):
        csv = out / f"{i}.csv"
        result = runner.invoke(app, ["route", line, "-m", str(mixtral_dir), "--device", "cpu", "-q", "--csv", str(csv)])
        assert result.exit_code == 0, result.output
        frames.append(pd.read_csv(csv, keep_default_na=False).assign(sequence=i))
    return pd.concat(frames, ignore_index=True)


@pytest.mark.parametrize("initial_rows", [1, 256])
def test_counts_equal_route_csvs(
    mixtral_dir: Path, route_rows: pd.DataFrame, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, initial_rows: int
) -> None:
    """initial_rows=1 grows the device counters on almost every batch (the resize path)."""
    monkeypatch.setattr(TokenCounter, "INITIAL_ROWS", initial_rows)
    corpus = tmp_path / "lines.txt"
    corpus.write_text("\n".join(LINES) + "\n", encoding="utf-8")
    out = tmp_path / "run"
    args = ["balance", str(corpus), "-m", str(mixtral_dir), "--device", "cpu", "--lines", "--batch-size", "2"]
    result = runner.invoke(app, [*args, "--top-tokens", "1000", "--min-count", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    got = pd.read_csv(out / "expert_tokens.csv", keep_default_na=False)
    assert list(got.columns) == schemas.EXPERT_TOKENS.names
    # With N above the vocabulary every (layer, expert, token id) seen is listed: compare all of them.
    want_any = Counter(zip(route_rows.layer, route_rows.expert, route_rows.token_id, strict=True))
    first_rows = route_rows[route_rows["rank"] == 0]
    want_first = Counter(zip(first_rows.layer, first_rows.expert, first_rows.token_id, strict=True))
    got_any = {(r.layer, r.expert, r.token_id): r.count for r in got.itertuples()}
    got_first = {(r.layer, r.expert, r.token_id): r.first_choice for r in got.itertuples()}
    assert got_any == dict(want_any)
    assert got_first == {key: want_first.get(key, 0) for key in want_any}
    # share_of_expert and lift from the same rows.
    tokens = first_rows.groupby("layer").size()
    for r in got.sample(20, random_state=0).itertuples():
        expert_total = sum(c for (layer, e, _), c in want_any.items() if layer == r.layer and e == r.expert)
        occurrences = len(first_rows[(first_rows.layer == r.layer) & (first_rows.token_id == r.token_id)])
        assert r.share_of_expert == pytest.approx(r.count / expert_total)
        assert r.lift == pytest.approx((r.count / expert_total) / (occurrences / tokens[r.layer]))
    # vocab_specialization: per token id the largest first-choice share, weighted by occurrences.
    layers = pd.read_csv(out / "layers.csv")
    for layer, rows in first_rows.groupby("layer"):
        per_token = rows.groupby(["token_id", "expert"]).size().groupby(level=0)
        expected = per_token.max().sum() / len(rows)
        got_layer = layers.set_index("layer").loc[layer]
        assert got_layer["vocab_specialization"] == pytest.approx(expected)
        assert 0 < got_layer["vocab_specialization_random"] <= 1
    assert "expert" in result.output and "top tokens" in result.output


def test_top_n_and_min_count(mixtral_dir: Path) -> None:
    insp = moe_inspect.load(str(mixtral_dir), device="cpu")
    report = insp.balance(LINES, top_tokens=2, min_count=3)
    frame = report.expert_tokens
    assert frame is not None
    for (_, _), rows in frame.groupby(["layer", "expert"]):
        frequent = rows[rows.listed.isin(["frequent", "both"])]
        lifted = rows[rows.listed.isin(["lift", "both"])]
        assert len(frequent) <= 2 and len(lifted) <= 2
        assert (lifted["count"] >= 3).all()
    assert insp.balance(LINES, lines=True).expert_tokens is None


def test_token_layers_limit_the_counting(mixtral_dir: Path, tmp_path: Path) -> None:
    insp = moe_inspect.load(str(mixtral_dir), device="cpu")
    report = insp.balance(LINES, lines=True, top_tokens=2, top_token_layers=[1])
    assert report.expert_tokens is not None and set(report.expert_tokens.layer) == {1}
    specialization = report.layers.set_index("layer").vocab_specialization
    assert specialization.notna().to_dict() == {layer: layer == 1 for layer in specialization.index}
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(LINES) + "\n", encoding="utf-8")
    args = ["balance", str(corpus), "-m", str(mixtral_dir), "--device", "cpu", "--lines", "--top-tokens", "2"]
    result = runner.invoke(app, [*args, "--top-token-layers", "7"])
    assert result.exit_code == 2 and "--top-token-layers names layer(s) 7 with no router" in result.output


def test_counter_rows_never_exceed_the_vocabulary() -> None:
    counter = TokenCounter([], vocab_size=300)
    counter.begin_batch(torch.arange(200).view(2, 100), torch.ones(2, 100, dtype=torch.long))
    counter.end_batch()
    assert counter._capacity == 256
    counter.begin_batch(torch.arange(100, 300).view(2, 100), torch.ones(2, 100, dtype=torch.long))
    counter.end_batch()
    assert counter._capacity == 300  # not 512
    counter.begin_batch(torch.tensor([[5, 299]]), torch.tensor([[1, 0]]))  # pads are never counted
    counter.end_batch()
    assert len(counter._ids) == 300
    counter.begin_batch(torch.tensor([[300, 7]]), torch.tensor([[1, 1]]))  # a batch that never finished
    assert len(counter._ids) == 301
    assert counter.finish() == [] and len(counter._ids) == 300  # its new id is forgotten again


def test_vocab_specialization_random_baseline() -> None:
    # Ids seen once always score 1; a large id under a uniform load tends to 1/E.
    assert metrics.vocab_specialization_random([1, 1, 1], [0.5, 0.5]) == 1.0
    assert metrics.vocab_specialization_random([100_000], [0.25] * 4) == pytest.approx(0.25, abs=0.01)
    assert math.isnan(metrics.vocab_specialization_random([0], [1.0]))
    assert np.isclose(metrics.vocab_specialization([[3, 1], [0, 2]]).numpy(), [0.75, 1.0]).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_token_counter_does_not_sync_with_the_host_and_matches_cpu(mixtral_dir: Path) -> None:
    """Per router call the counter only launches kernels; the host sees the counts once, in finish()."""
    text = "\n".join(LINES * 8)
    cpu = moe_inspect.load(str(mixtral_dir), device="cpu").balance(text, seq_len=16, batch_size=4, top_tokens=50)
    insp = moe_inspect.load(str(mixtral_dir), device="cuda")
    batch = next(insp.corpus(text, seq_len=16, batch_size=4).batches())
    with torch.inference_mode(), capture(insp.loaded.routers) as cap:
        insp.model(input_ids=batch.input_ids.cuda(), attention_mask=batch.attention_mask.cuda())
    counter = TokenCounter(insp.loaded.routers)
    counter.begin_batch(batch.input_ids, batch.attention_mask)
    for spec, calls in zip(insp.loaded.routers, cap.calls, strict=True):  # warm-up: state allocation
        counter(spec, calls[0])
    counter.end_batch()
    counter.begin_batch(batch.input_ids, batch.attention_mask)
    counter._rows_on(torch.device("cuda", torch.cuda.current_device()))  # the one copy per batch
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for spec, calls in zip(insp.loaded.routers, cap.calls, strict=True):
            counter(spec, calls[0])
        counter.end_batch()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    totals = counter.finish()
    assert all(t.any_rank.sum() == 2 * batch.tokens * t.spec.top_k for t in totals)
    gpu = insp.balance(text, seq_len=16, batch_size=4, top_tokens=50)
    pd.testing.assert_frame_equal(gpu.expert_tokens, cpu.expert_tokens)
