"""`balance`: streamed counts and per-layer figures checked against brute force over per-token capture.

Every expected value here is recomputed independently (numpy / Python loops over captured routing, or
transformers' own ``load_balancing_loss_func``), never by calling the formulas the library uses.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
import transformers
from cli_checks import assert_no_exception
from tiny_models import LINES, SAMPLE_TEXT
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func
from typer.testing import CliRunner

from moe_inspect.analysis import routing_pass
from moe_inspect.analysis.accumulate import BalanceAccumulator
from moe_inspect.analysis.tables import experts_frame, layers_frame
from moe_inspect.api import Inspector
from moe_inspect.cli import app
from moe_inspect.io.corpus import Batch, CorpusReader
from moe_inspect.io.export import write_csv
from moe_inspect.model.capture import RouterOutput, capture
from moe_inspect.model.routers import RouterSpec

CFS = (1.0, 1.25, 2.0)
LINES_TEXT = "\n".join(LINES) + "\n\n   \n" + "\n".join(reversed(LINES)) + "\n"
runner = CliRunner()


@pytest.fixture(scope="module")
def mixtral_dir(tiny_dir) -> Path:
    return tiny_dir("mixtral", bos=True)


@pytest.fixture(scope="module")
def mixtral(tiny_inspector) -> Inspector:
    return tiny_inspector("mixtral", bos=True)


@pytest.fixture(scope="module")
def deepseek(tiny_inspector) -> Inspector:
    return tiny_inspector("deepseek_v3", bos=True)


@pytest.fixture
def padding_side(mixtral: Inspector) -> Iterator[None]:
    """Restore the shared tokenizer's padding side after a test that changes it."""
    side = mixtral.tokenizer.padding_side
    yield
    mixtral.tokenizer.padding_side = side


# ------------------------------------------------------------------------------------------------------
# brute force from per-token capture
# ------------------------------------------------------------------------------------------------------


def _captured(insp: Inspector, reader: CorpusReader) -> list[tuple[Batch, list[RouterOutput]]]:
    """Each batch of ``reader`` with every router's RouterOutput, from a plain forward under capture()."""
    result = []
    for batch in reader.batches():
        with torch.inference_mode(), capture(insp.loaded.routers) as cap:
            insp.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
        result.append((batch, [calls[0] for calls in cap.calls]))
    return result


def _brute_force(insp: Inspector, reader: CorpusReader, cfs: tuple[float, ...]) -> list[dict[str, Any]]:
    """Per-layer counts and figures from Python loops over the captured per-token routing."""
    results = []
    captured = _captured(insp, reader)
    for spec in insp.loaded.routers:
        e, k = spec.num_experts, spec.top_k
        count = np.zeros(e, dtype=np.int64)
        first = np.zeros(e, dtype=np.int64)
        weight_sum = np.zeros(e)
        prob_sum = np.zeros(e)
        coact = np.zeros((e, e), dtype=np.int64)
        hf_count = np.zeros(e)
        entropy = top1 = z = 0.0
        tokens = pairs = same_first = overlap = 0
        dropped = dict.fromkeys(cfs, 0)
        for batch, outs in captured:
            out = outs[spec.index]
            b, s = batch.input_ids.shape
            experts = out.experts.numpy().reshape(b, s, k)
            weights = out.weights.numpy().reshape(b, s, k)
            logits = out.logits.double().numpy().reshape(b, s, e)
            mask = batch.attention_mask.numpy().astype(bool)
            batch_real = int(mask.sum())
            loads = {cf: np.zeros(e, dtype=np.int64) for cf in cfs}
            capacity = {cf: math.ceil(cf * batch_real * k / e) for cf in cfs}
            for row in range(b):
                previous: list[int] | None = None
                for pos in range(s):
                    if not mask[row, pos]:
                        continue
                    chosen = [int(x) for x in experts[row, pos]]
                    tokens += 1
                    first[chosen[0]] += 1
                    for rank, x in enumerate(chosen):
                        count[x] += 1
                        weight_sum[x] += float(weights[row, pos, rank])
                        for y in chosen:
                            if y != x:
                                coact[x, y] += 1
                    for cf in cfs:  # position policy: earlier tokens of the batch win, ranks together
                        for x in chosen:
                            if loads[cf][x] < capacity[cf]:
                                loads[cf][x] += 1
                            else:
                                dropped[cf] += 1
                    row_logits = logits[row, pos]
                    p = np.exp(row_logits - row_logits.max())
                    p /= p.sum()
                    prob_sum += p
                    entropy += float(-(p * np.log(p)).sum() / math.log(e))
                    top1 += float(p.max())
                    lse = row_logits.max() + math.log(np.exp(row_logits - row_logits.max()).sum())
                    z += lse**2
                    for x in np.argsort(-p, kind="stable")[:k]:
                        hf_count[x] += 1
                    if previous is not None:
                        pairs += 1
                        same_first += previous[0] == chosen[0]
                        overlap += bool(set(previous) & set(chosen))
                    previous = chosen
        results.append(
            {
                "layer": spec.layer,
                "experts": e,
                "top_k": k,
                "count": count,
                "first_choice": first,
                "mean_weight": np.divide(weight_sum, count, out=np.full(e, np.nan), where=count > 0),
                "mean_prob": prob_sum / tokens,
                "coactivation": coact,
                "tokens": tokens,
                "router_entropy": entropy / tokens,
                "top1_prob": top1 / tokens,
                "z_loss": z / tokens,
                "switch_loss": e * float(((first / tokens) * (prob_sum / tokens)).sum()),
                "aux_loss": e * float(((hf_count / tokens) * (prob_sum / tokens)).sum()),
                "repeat_first": same_first / pairs,
                "repeat_any": overlap / pairs,
                "dropped": {cf: d / (tokens * k) for cf, d in dropped.items()},
            }
        )
    return results


def _layer_row(report: Any, layer: int) -> pd.Series:
    rows = report.layers[report.layers["layer"] == layer]
    assert len(rows) == 1
    return rows.iloc[0]


@pytest.mark.parametrize(
    ("mode", "text", "seq_len", "batch_size"),
    [("packed", SAMPLE_TEXT, 16, 5), ("lines", LINES_TEXT, 12, 3)],
    ids=["packed", "lines"],
)
def test_counts_and_figures_equal_brute_force(
    mixtral: Inspector, mode: str, text: str, seq_len: int, batch_size: int
) -> None:
    lines = mode == "lines"
    report = mixtral.balance(text, seq_len=seq_len, batch_size=batch_size, lines=lines, capacity_factors=CFS)
    reader = mixtral.corpus(text, seq_len=seq_len, batch_size=batch_size, lines=lines)
    if lines:  # the padded mode must really contain padding for this test to mean something
        assert any(int(b.attention_mask.min()) == 0 for b in reader.batches())
    expected = _brute_force(mixtral, reader, CFS)
    assert len(expected) == len(mixtral.loaded.routers) == 3
    assert sorted(report.layers["layer"]) == [0, 1, 2]
    assert list(report.experts.columns[:4]) == ["layer", "expert", "count", "share"]
    for exp in expected:
        layer, e, k, tokens = exp["layer"], exp["experts"], exp["top_k"], exp["tokens"]
        experts = report.experts[report.experts["layer"] == layer].sort_values("expert")
        assert experts["expert"].tolist() == list(range(e))
        np.testing.assert_array_equal(experts["count"].to_numpy(), exp["count"])
        np.testing.assert_array_equal(experts["first_choice"].to_numpy(), exp["first_choice"])
        assert exp["count"].sum() == tokens * k
        np.testing.assert_allclose(experts["share"].to_numpy(), exp["count"] / (tokens * k), rtol=1e-12)
        np.testing.assert_allclose(experts["token_share"].to_numpy(), exp["count"] / tokens, rtol=1e-12)
        np.testing.assert_allclose(experts["mean_weight"].to_numpy(), exp["mean_weight"], rtol=1e-5)
        np.testing.assert_allclose(experts["mean_prob"].to_numpy(), exp["mean_prob"], rtol=1e-5)

        coact = report.coactivation[report.coactivation["layer"] == layer]
        got = {(int(r.expert_a), int(r.expert_b)): int(r.count) for r in coact.itertuples()}
        want = {
            (int(a), int(b)): int(exp["coactivation"][a, b])
            for a, b in zip(*np.nonzero(exp["coactivation"]), strict=True)
        }
        assert got == want and want
        for r in coact.itertuples():
            assert r.share_of_a == pytest.approx(r.count / exp["count"][r.expert_a])

        row = _layer_row(report, layer)
        assert row["tokens"] == tokens
        assert (row["experts"], row["top_k"]) == (e, k)
        n = exp["count"].astype(float)
        share = n / n.sum()
        h = -(share[share > 0] * np.log(share[share > 0])).sum()
        assert row["load_entropy"] == pytest.approx(h / math.log(e), rel=1e-9)
        assert row["effective_experts"] == pytest.approx(math.exp(h), rel=1e-9)
        assert row["cv"] == pytest.approx(n.std() / n.mean(), rel=1e-9)
        assert row["max_over_mean"] == pytest.approx(n.max() / n.mean(), rel=1e-9)
        assert row["jain"] == pytest.approx(n.sum() ** 2 / (e * (n**2).sum()), rel=1e-9)
        assert row["dead_experts"] == int((n == 0).sum())
        for name in ("router_entropy", "top1_prob", "z_loss", "switch_loss", "aux_loss"):
            assert row[name] == pytest.approx(exp[name], rel=1e-5), name
        assert row["repeat_first"] == pytest.approx(exp["repeat_first"], rel=1e-12)
        assert row["repeat_any"] == pytest.approx(exp["repeat_any"], rel=1e-12)
        assert row["repeat_first_random"] == pytest.approx(1 / e)
        assert row["repeat_any_random"] == pytest.approx(1 - math.comb(e - k, k) / math.comb(e, k))
        assert row["null_share"] == 0
        for cf in CFS:
            assert row[f"drop_rate_cf{cf:g}"] == pytest.approx(exp["dropped"][cf], rel=1e-12), cf
        assert row["drop_rate_cf1"] > 0  # 8 experts, a few hundred tokens: capacity 1.0 must drop some


def test_packed_token_count(mixtral: Inspector) -> None:
    report = mixtral.balance(SAMPLE_TEXT, seq_len=16, batch_size=5, pack=True)
    n = len(mixtral.tokenizer(SAMPLE_TEXT)["input_ids"])  # BOS + text, as the packed stream holds it
    assert report.run["tokens"] == n // 16 * 16
    assert set(report.layers["tokens"]) == {n // 16 * 16}


# ------------------------------------------------------------------------------------------------------
# aux loss against transformers' own function
# ------------------------------------------------------------------------------------------------------


def test_aux_loss_equals_transformers_function_single_padded_batch(mixtral: Inspector) -> None:
    reader = mixtral.corpus(LINES, seq_len=20, batch_size=len(LINES), lines=True)
    [(batch, outs)] = _captured(mixtral, reader)
    mask = batch.attention_mask
    assert int(mask.min()) == 0  # padded, so the mask matters
    report = mixtral.balance(LINES, seq_len=20, batch_size=len(LINES), lines=True)
    for spec in mixtral.loaded.routers:
        logits = outs[spec.index].logits
        want = float(load_balancing_loss_func((logits,), spec.num_experts, spec.top_k, mask))
        unmasked = float(load_balancing_loss_func((logits,), spec.num_experts, spec.top_k, None))
        assert want != pytest.approx(unmasked, rel=1e-6)
        assert _layer_row(report, spec.layer)["aux_loss"] == pytest.approx(want, rel=1e-5)


def test_aux_loss_over_batches_is_the_function_on_all_logits(mixtral: Inspector) -> None:
    """Packed windows all have seq_len columns, so the batches' logits and masks can be concatenated."""
    reader = mixtral.corpus(SAMPLE_TEXT, seq_len=16, batch_size=5, pack=True)
    captured = _captured(mixtral, reader)
    assert len(captured) > 1
    mask = torch.cat([b.attention_mask for b, _ in captured])
    report = mixtral.balance(SAMPLE_TEXT, seq_len=16, batch_size=5, pack=True)
    for spec in mixtral.loaded.routers:
        logits = torch.cat([outs[spec.index].logits for _, outs in captured])
        want = float(load_balancing_loss_func((logits,), spec.num_experts, spec.top_k, mask))
        assert _layer_row(report, spec.layer)["aux_loss"] == pytest.approx(want, rel=1e-5)


# ------------------------------------------------------------------------------------------------------
# padding: a padded batch is the same as its lines one by one
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.usefixtures("padding_side")
def test_padded_batch_equals_lines_one_by_one(mixtral: Inspector, side: str) -> None:
    mixtral.tokenizer.padding_side = side
    batch = next(mixtral.corpus(LINES, seq_len=20, batch_size=len(LINES), lines=True).batches())
    pad_column = 0 if side == "left" else -1
    assert int(batch.attention_mask[:, pad_column].min()) == 0  # padding really on that side
    # Mixtral's rotary positions are shift-invariant, so equal figures alone would not show that left-padded
    # rows get the positions of their real tokens: check the position ids the forward received.
    received: list[torch.Tensor] = []
    rotary = mixtral.model.model.rotary_emb
    handle = rotary.register_forward_pre_hook(
        lambda _m, args, kwargs: received.append(kwargs.get("position_ids", args[-1]).clone()), with_kwargs=True
    )
    try:
        together = mixtral.balance(LINES, seq_len=20, batch_size=len(LINES), lines=True)
    finally:
        handle.remove()
    (positions,) = received
    mask = batch.attention_mask.bool()
    assert positions.shape == mask.shape
    for row, row_mask in zip(positions, mask, strict=True):
        assert row[row_mask].tolist() == list(range(int(row_mask.sum())))
    alone = mixtral.balance(LINES, seq_len=20, batch_size=1, lines=True)
    assert together.run["batches"] == 1 and alone.run["batches"] == len(LINES)
    pd.testing.assert_frame_equal(together.experts, alone.experts, check_exact=False, atol=1e-5, rtol=0)
    pd.testing.assert_frame_equal(together.coactivation, alone.coactivation, check_exact=False, atol=1e-5, rtol=0)
    # Drop rates depend on the batch by definition (capacity per batch); everything else must agree.
    columns = [c for c in together.layers.columns if not c.startswith("drop_rate")]
    pd.testing.assert_frame_equal(together.layers[columns], alone.layers[columns], check_exact=False, atol=1e-5)


# ------------------------------------------------------------------------------------------------------
# DeepSeek-V3: bias-corrected, group-limited selection
# ------------------------------------------------------------------------------------------------------


def test_deepseek_v3_counts_what_the_experts_received(deepseek: Inspector, monkeypatch: pytest.MonkeyPatch) -> None:
    # every experts module must run here, so the routing pass may not stop after the last router (that it
    # captures the same routing when it does is tests/test_routing_pass.py's job)
    monkeypatch.setattr(routing_pass, "_can_stop_early", lambda _model: False)
    e = deepseek.loaded.routers[0].num_experts
    k = deepseek.loaded.routers[0].top_k
    assert {spec.selection for spec in deepseek.loaded.routers} == {"bias-corrected"}
    received = {spec.layer: np.zeros(e, dtype=np.int64) for spec in deepseek.loaded.routers}
    received_first = {spec.layer: np.zeros(e, dtype=np.int64) for spec in deepseek.loaded.routers}
    received_weight = {spec.layer: np.zeros(e) for spec in deepseek.loaded.routers}
    naive_sigmoid = {spec.layer: np.zeros(e, dtype=np.int64) for spec in deepseek.loaded.routers}
    differs = 0
    current: dict[str, Any] = {}
    handles = []

    def model_pre_hook(_module: Any, _args: Any, kwargs: dict[str, Any]) -> None:
        current["mask"] = kwargs["attention_mask"].reshape(-1).bool()

    def gate_hook(layer: int) -> Any:
        def hook(_module: Any, _args: Any, out: Any) -> None:
            current[layer] = out[0].detach()  # router logits

        return hook

    def experts_pre_hook(layer: int) -> Any:
        def hook(_module: Any, args: Any) -> None:
            nonlocal differs
            mask = current["mask"]
            index, weights = args[1][mask], args[2][mask].double()
            received[layer] += np.bincount(index.reshape(-1).numpy(), minlength=e)
            received_first[layer] += np.bincount(index[:, 0].numpy(), minlength=e)
            np.add.at(received_weight[layer], index.reshape(-1).numpy(), weights.reshape(-1).numpy())
            logits = current[layer][mask]
            naive = torch.topk(torch.sigmoid(logits), k, dim=-1).indices
            naive_sigmoid[layer] += np.bincount(naive.reshape(-1).numpy(), minlength=e)
            differs += int((naive.sort(-1).values != index.sort(-1).values).any(-1).sum())

        return hook

    model = deepseek.model
    handles.append(model.model.register_forward_pre_hook(model_pre_hook, with_kwargs=True))  # the decoder
    for spec in deepseek.loaded.routers:
        mlp = model.get_submodule(spec.path.rsplit(".", 1)[0])
        handles.append(mlp.gate.register_forward_hook(gate_hook(spec.layer)))
        handles.append(mlp.experts.register_forward_pre_hook(experts_pre_hook(spec.layer)))
    try:
        report = deepseek.balance(LINES_TEXT, seq_len=12, batch_size=4, lines=True)
    finally:
        for handle in handles:
            handle.remove()
    assert differs > 0  # the naive top-k of the scores picks other experts: the test is meaningful
    for spec in deepseek.loaded.routers:
        rows = report.experts[report.experts["layer"] == spec.layer].sort_values("expert")
        count = rows["count"].to_numpy()
        np.testing.assert_array_equal(count, received[spec.layer])
        np.testing.assert_array_equal(rows["first_choice"].to_numpy(), received_first[spec.layer])
        np.testing.assert_allclose(
            rows["mean_weight"].to_numpy(),
            np.divide(received_weight[spec.layer], count, out=np.full(e, np.nan), where=count > 0),
            rtol=1e-5,
        )
        assert count.sum() == _layer_row(report, spec.layer)["tokens"] * k
    assert any(not np.array_equal(received[spec.layer], naive_sigmoid[spec.layer]) for spec in deepseek.loaded.routers)


# ------------------------------------------------------------------------------------------------------
# uniform sanity on synthetic router outputs
# ------------------------------------------------------------------------------------------------------


def _spec(num_experts: int, top_k: int) -> RouterSpec:
    return RouterSpec(
        index=0,
        layer=0,
        path="model.layers.0.mlp.gate",
        kind="mlp",
        model_type="mixtral",
        router_class="MixtralTopKRouter",
        num_experts=num_experts,
        top_k=top_k,
        null_experts=0,
        null_label="",
        scoring="softmax",
        parser="tuple",
        logits_index=0,
        selection="top-k",
        shared_experts=0,
    )


def test_uniform_routing_gives_the_textbook_values() -> None:
    e, k = 4, 2
    spec = _spec(e, k)
    pattern = [[0, 1], [2, 3], [1, 0], [3, 2]]  # every expert twice, first choice once each, per 4 tokens
    batch, seq = 2, 5
    mask = torch.ones(batch, seq, dtype=torch.int64)
    mask[:, -1] = 0  # one pad per row, filled with skewed garbage that must be ignored
    experts = torch.zeros(batch, seq, k, dtype=torch.int64)
    logits = torch.zeros(batch, seq, e)
    weights = torch.full((batch, seq, k), 0.5)
    for row in range(batch):
        experts[row, :4] = torch.tensor(pattern)
        experts[row, 4] = torch.tensor([0, 1])
        logits[row, 4] = torch.tensor([20.0, 5.0, -3.0, -3.0])
        weights[row, 4] = torch.tensor([0.99, 0.01])
    accumulator = BalanceAccumulator([spec], capacity_factors=(1.0,))
    accumulator.begin_batch(mask)
    accumulator(spec, RouterOutput(logits.reshape(-1, e), experts.reshape(-1, k), weights.reshape(-1, k)))
    accumulator.end_batch()
    totals = accumulator.finish()
    row = layers_frame(totals, (1.0,)).iloc[0]
    assert row["tokens"] == 8
    assert row["load_entropy"] == pytest.approx(1.0)
    assert row["effective_experts"] == pytest.approx(e)
    assert row["cv"] == pytest.approx(0.0, abs=1e-12)
    assert row["jain"] == pytest.approx(1.0)
    assert row["max_over_mean"] == pytest.approx(1.0)
    assert row["dead_experts"] == 0
    assert row["switch_loss"] == pytest.approx(1.0)
    assert row["aux_loss"] == pytest.approx(k)
    assert row["router_entropy"] == pytest.approx(1.0)
    assert row["top1_prob"] == pytest.approx(1 / e)
    assert row["z_loss"] == pytest.approx(math.log(e) ** 2)
    assert row["drop_rate_cf1"] == 0  # capacity ceil(8*2/4) = 4, exactly each expert's load
    assert row["repeat_first"] == 0 and row["repeat_any"] == 0  # consecutive sets never intersect
    frame = experts_frame(totals)
    assert frame["count"].tolist() == [4, 4, 4, 4]
    assert frame["first_choice"].tolist() == [2, 2, 2, 2]
    np.testing.assert_allclose(frame["share"], 1 / e)
    np.testing.assert_allclose(frame["token_share"], k / e)
    np.testing.assert_allclose(frame["mean_prob"], 1 / e)
    np.testing.assert_allclose(frame["mean_weight"], 0.5)


# ------------------------------------------------------------------------------------------------------
# the CLI
# ------------------------------------------------------------------------------------------------------


def _run_cli(args: list[str], stdin: str | None = None, exit_code: int = 0) -> Any:
    result = runner.invoke(app, args, input=stdin)
    assert_no_exception(result, exit_code)
    return result


def test_cli_writes_tables_run_json_and_plot(mixtral_dir: Path, tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(SAMPLE_TEXT, encoding="utf-8")
    out = tmp_path / "out"
    args = ["-m", str(mixtral_dir), "--seq-len", "16", "--batch-size", "4"]
    result = _run_cli(["balance", str(corpus), *args, "--out", str(out), "--plot", str(out / "p.png")])
    assert result.exit_code == 0, result.output
    for name in ("layers.csv", "experts.csv", "coactivation.csv", "run.json", "p.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    experts = pd.read_csv(out / "experts.csv")
    assert list(experts.columns[:4]) == ["layer", "expert", "count", "share"]
    layers = pd.read_csv(out / "layers.csv")
    assert {"aux_loss", "drop_rate_cf1", "drop_rate_cf1.25", "drop_rate_cf2", "repeat_any"} <= set(layers.columns)
    run = json.loads((out / "run.json").read_text())
    assert run["model"] == str(mixtral_dir)
    assert run["dtype"] == "float32"
    assert run["device"] == "cpu"
    assert run["corpus"][0]["sha256"] == hashlib.sha256(corpus.read_bytes()).hexdigest()
    assert run["corpus"][0]["bytes"] == corpus.stat().st_size
    assert run["tokens"] == int(layers["tokens"].iloc[0]) > 0
    assert run["tokens"] % 16 == 0
    assert int(experts.groupby("layer")["count"].sum().iloc[0]) == run["tokens"] * 2
    assert run["seq_len"] == 16
    assert run["batch_size"] == 4
    assert run["partial"] is False
    assert run["packages"]["transformers"] == transformers.__version__
    assert "revision" in run

    # The same text on standard input gives the same tables.
    out_stdin = tmp_path / "stdin"
    result = _run_cli(["balance", "-", *args, "--out", str(out_stdin)], stdin=SAMPLE_TEXT)
    assert result.exit_code == 0, result.output
    run_stdin = json.loads((out_stdin / "run.json").read_text())
    assert run_stdin["corpus"][0]["sha256"] == hashlib.sha256(SAMPLE_TEXT.encode()).hexdigest()
    assert run_stdin["tokens"] == run["tokens"]
    pd.testing.assert_frame_equal(pd.read_csv(out_stdin / "experts.csv"), experts)


def test_cli_max_tokens(mixtral_dir: Path, tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(SAMPLE_TEXT, encoding="utf-8")
    out = tmp_path / "out"
    result = _run_cli(
        ["balance", str(corpus), "-m", str(mixtral_dir), "--seq-len", "16", "--max-tokens", "40", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    run = json.loads((out / "run.json").read_text())
    assert run["tokens"] == 40
    assert run["max_tokens"] == 40
    assert set(pd.read_csv(out / "layers.csv")["tokens"]) == {40}
    assert set(pd.read_csv(out / "experts.csv").groupby("layer")["count"].sum()) == {80}


# ------------------------------------------------------------------------------------------------------
# Ctrl-C
# ------------------------------------------------------------------------------------------------------


def test_interrupt_returns_what_was_accumulated(mixtral: Inspector) -> None:
    seen: list[int] = []

    def progress(batch: Batch) -> None:
        seen.append(batch.tokens)
        if len(seen) == 2:
            raise KeyboardInterrupt

    report = mixtral.balance(SAMPLE_TEXT, seq_len=16, batch_size=3, progress=progress)
    assert report.partial and report.run["partial"] is True
    assert seen == [48, 48]
    assert report.run["tokens"] == 96
    assert set(report.layers["tokens"]) == {96}
    full_two = mixtral.balance(SAMPLE_TEXT, seq_len=16, batch_size=3, max_tokens=96)
    assert not full_two.partial and full_two.run["partial"] is False
    pd.testing.assert_frame_equal(report.experts, full_two.experts)


def test_cli_interrupt_writes_partial_outputs(
    mixtral_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = CorpusReader.batches

    def interrupted(self: CorpusReader) -> Iterator[Batch]:
        for i, batch in enumerate(original(self)):
            if i == 2:
                raise KeyboardInterrupt
            yield batch

    monkeypatch.setattr(CorpusReader, "batches", interrupted)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(SAMPLE_TEXT, encoding="utf-8")
    out = tmp_path / "out"
    _run_cli(
        ["balance", str(corpus), "-m", str(mixtral_dir), "--seq-len", "16", "--batch-size", "2", "--out", str(out)],
        exit_code=130,
    )
    assert sorted(p.name for p in out.iterdir()) == ["coactivation.csv", "experts.csv", "layers.csv", "run.json"]
    run = json.loads((out / "run.json").read_text())
    assert run["partial"] is True
    assert run["tokens"] == 2 * 2 * 16
    assert set(pd.read_csv(out / "layers.csv")["tokens"]) == {64}


# ------------------------------------------------------------------------------------------------------
# atomic writes
# ------------------------------------------------------------------------------------------------------


def test_write_csv_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "t.csv"
    write_csv(pd.DataFrame({"a": [1, 2]}), path)
    assert path.read_text() == "a\n1\n2\n"
    assert [p.name for p in tmp_path.iterdir()] == ["t.csv"]

    def broken(self: pd.DataFrame, handle: Any, **_: Any) -> None:
        handle.write("a\n99\n")
        raise OSError("disk full")

    monkeypatch.setattr(pd.DataFrame, "to_csv", broken)
    with pytest.raises(OSError, match="disk full"):
        write_csv(pd.DataFrame({"a": [3]}), path)
    assert path.read_text() == "a\n1\n2\n"
    assert [p.name for p in tmp_path.iterdir()] == ["t.csv"]
