"""`compare`: figures equal a brute-force computation from both models' own router outputs and full logits.

Model B is model A with known router perturbations (noise on one layer's router weights, two experts' rows swapped
in another), so routes flip on some tokens and not others. Every expected value is recomputed with Python loops and
numpy over a plain forward of each model under capture(), never with the library's formulas.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
import weakref
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from tiny_models import SAMPLE_TEXT, save_tiny
from transformers import AutoModelForCausalLM, AutoTokenizer

import moe_inspect
from moe_inspect.analysis import compare as compare_mod
from moe_inspect.analysis.compare import Interrupted, compare_two_pass
from moe_inspect.api import Inspector
from moe_inspect.metrics import routing_distribution
from moe_inspect.model.capture import capture
from moe_inspect.model.loading import load
from moe_inspect.model.options import LoadOptions

ROOT = Path(__file__).resolve().parent.parent
TEXT = SAMPLE_TEXT * 2
READ = {"seq_len": 16, "batch_size": 3}


def _perturbed(src: Path, dst: Path) -> Path:
    """A copy of ``src`` whose layer-0 router has noise added and whose layer-1 router swaps experts 0 and 1."""
    model = AutoModelForCausalLM.from_pretrained(src)
    generator = torch.Generator().manual_seed(3)
    gates = [m for name, m in model.named_modules() if name.endswith("mlp.gate")]
    with torch.no_grad():
        gates[0].weight.add_(torch.randn(gates[0].weight.shape, generator=generator) * 0.3)
        gates[1].weight.copy_(gates[1].weight[[1, 0, *range(2, gates[1].weight.shape[0])]])
    model.save_pretrained(dst)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


@pytest.fixture(scope="module", params=["mixtral", "deepseek_v3"])
def pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Inspector, Inspector]:
    root = tmp_path_factory.mktemp(request.param)
    src = save_tiny(request.param, root / "a")
    dst = _perturbed(src, root / "b")
    return moe_inspect.load(str(src), device="cpu"), moe_inspect.load(str(dst), device="cpu")


def _forward(insp: Inspector, batch) -> tuple[list, torch.Tensor]:
    positions = (batch.attention_mask.cumsum(-1) - 1).clamp_min(0)
    with torch.inference_mode(), capture(insp.loaded.routers) as cap:
        logits = insp.model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=positions, use_cache=False
        ).logits
    return [calls[0] for calls in cap.calls], logits.float()


def _brute_force(
    a: Inspector, b: Inspector, read: dict | None = None
) -> tuple[dict[int, dict[str, float]], dict[str, float]]:
    per_layer: dict[int, dict[str, list[float]]] = {}
    loads: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    agree, kls = [], []
    for batch in a.corpus(TEXT, **(read or READ)).batches():
        outs_a, logits_a = _forward(a, batch)
        outs_b, logits_b = _forward(b, batch)
        real = batch.attention_mask.reshape(-1).bool().numpy()
        for spec, oa, ob in zip(a.loaded.routers, outs_a, outs_b, strict=True):
            k, e = spec.top_k, spec.num_experts
            pa = routing_distribution(oa.logits, spec.scoring).double().numpy()[real]
            pb = routing_distribution(ob.logits, spec.scoring).double().numpy()[real]
            ea, eb = oa.experts.numpy()[real], ob.experts.numpy()[real]
            wa, wb = oa.weights.double().numpy()[real], ob.weights.double().numpy()[real]
            names = ("first", "ov", "jac", "exact", "w", "js", "mc", "mk")
            rows = per_layer.setdefault(spec.layer, {n: [] for n in names})
            count = loads.setdefault(spec.layer, (np.zeros(e), np.zeros(e)))
            for t in range(len(ea)):
                sa, sb = set(ea[t].tolist()), set(eb[t].tolist())
                inter = len(sa & sb)
                rows["first"].append(float(ea[t, 0] == eb[t, 0]))
                rows["ov"].append(inter / k)
                rows["jac"].append(inter / len(sa | sb))
                rows["exact"].append(float(sa == sb))
                da = {x: w / wa[t].sum() for x, w in zip(ea[t], wa[t], strict=True)}
                db = {x: w / wb[t].sum() for x, w in zip(eb[t], wb[t], strict=True)}
                rows["w"].append(sum(min(da[x], db[x]) for x in sa & sb))
                m = (pa[t] + pb[t]) / 2
                js = 0.5 * sum(p * math.log2(p / q) for p, q in zip(pa[t], m, strict=True) if p > 0)
                js += 0.5 * sum(p * math.log2(p / q) for p, q in zip(pb[t], m, strict=True) if p > 0)
                rows["js"].append(js)
                top = sorted(pa[t], reverse=True)
                (rows["mk"] if sa == sb else rows["mc"]).append(top[k - 1] - top[k])
                for x in ea[t]:
                    count[0][x] += 1
                for x in eb[t]:
                    count[1][x] += 1
        keep = batch.attention_mask.bool().clone()
        keep[:, :-1] &= batch.attention_mask[:, 1:].bool()
        keep[:, -1] = False
        la, lb = torch.log_softmax(logits_a[keep].double(), -1), torch.log_softmax(logits_b[keep].double(), -1)
        for row_a, row_b in zip(la, lb, strict=True):
            ids = row_a.topk(64).indices
            agree.append(float(row_a.argmax() == row_b.argmax()))
            pa_top, pb_top = row_a[ids].exp(), row_b[ids].exp()
            kl = float((pa_top * (row_a[ids] - row_b[ids])).sum())
            rest_a, rest_b = 1 - float(pa_top.sum()), 1 - float(pb_top.sum())
            kls.append(kl + (rest_a * math.log(rest_a / rest_b) if rest_a > 0 else 0.0))
    expected = {}
    for layer, rows in per_layer.items():
        ca, cb = loads[layer]
        sa, sb = ca / ca.sum(), cb / cb.sum()
        m = (sa + sb) / 2
        load_js = 0.5 * sum(p * math.log2(p / q) for p, q in zip(sa, m, strict=True) if p > 0)
        load_js += 0.5 * sum(p * math.log2(p / q) for p, q in zip(sb, m, strict=True) if p > 0)
        expected[layer] = {
            "tokens": len(rows["first"]),
            "first_choice_agreement": np.mean(rows["first"]),
            "topk_overlap": np.mean(rows["ov"]),
            "topk_jaccard": np.mean(rows["jac"]),
            "exact_set_agreement": np.mean(rows["exact"]),
            "weight_overlap": np.mean(rows["w"]),
            "routing_js": np.mean(rows["js"]),
            "load_tv": 0.5 * np.abs(sa - sb).sum(),
            "load_js": load_js,
            "margin_changed": np.mean(rows["mc"]) if rows["mc"] else math.nan,
            "margin_kept": np.mean(rows["mk"]) if rows["mk"] else math.nan,
            "count_a": ca,
            "count_b": cb,
        }
    return expected, {"top1_agreement": np.mean(agree), "output_kl": np.mean(kls), "positions": len(agree)}


@pytest.mark.parametrize("read", [READ, {"lines": True, "batch_size": 4, "seq_len": 64}], ids=["packed", "lines"])
def test_figures_equal_brute_force_from_both_models(pair: tuple[Inspector, Inspector], read: dict) -> None:
    a, b = pair
    report = a.compare(b, TEXT, **read)
    expected, outputs = _brute_force(a, b, read)
    layers = report.layers.set_index("layer")
    assert set(layers.index) == set(expected)
    assert (layers["first_choice_agreement"] < 1).any(), "the perturbation should flip some routes"
    assert (layers["exact_set_agreement"] > 0.1).all(), "and keep others (chance: 1/C(8,2) = 0.036)"
    for layer, exp in expected.items():
        row = layers.loc[layer]
        assert row["tokens"] == exp["tokens"]
        for name in ("first_choice_agreement", "topk_overlap", "topk_jaccard", "exact_set_agreement", "load_tv"):
            assert row[name] == pytest.approx(exp[name], abs=1e-12), name
        # weights and routing distributions are kept in float16 in the record: agreement to its precision
        for name in ("weight_overlap", "routing_js", "load_js", "margin_changed", "margin_kept"):
            assert row[name] == pytest.approx(exp[name], rel=2e-3, abs=2e-4, nan_ok=True), name
        experts = report.experts[report.experts["layer"] == layer]
        assert experts["count_a"].tolist() == exp["count_a"].tolist()
        assert experts["count_b"].tolist() == exp["count_b"].tolist()
    summary = report.summary.iloc[0]
    assert summary["predicted_positions"] == outputs["positions"]
    assert summary["top1_agreement"] == pytest.approx(outputs["top1_agreement"], abs=1e-12)
    assert summary["output_kl"] == pytest.approx(outputs["output_kl"], rel=1e-3, abs=1e-6)
    assert summary["output_kl"] > 0
    assert summary["worst_layer"] == int(report.layers.loc[report.layers["first_choice_agreement"].idxmin(), "layer"])


def test_two_pass_equals_together_and_holds_one_model(pair: tuple[Inspector, Inspector], tmp_path: Path) -> None:
    a, b = pair
    together = a.compare(b, TEXT, **READ)
    model_a: list[weakref.ref] = []
    a_alive_when_b_loads: list[bool] = []

    def load_a():
        fresh = load(LoadOptions(a.loaded.model_id, device="cpu"))  # nobody else holds this one
        model_a.append(weakref.ref(fresh.model))
        return fresh

    def load_b():
        a_alive_when_b_loads.append(model_a[0]() is not None)
        return b.loaded

    two_pass = compare_two_pass(load_a, load_b, a.corpus(TEXT, **READ).batches(), scratch=tmp_path / "scratch")
    assert a_alive_when_b_loads == [False], "model A must be freed before model B is loaded"
    pd.testing.assert_frame_equal(together.layers, two_pass.layers)
    pd.testing.assert_frame_equal(together.experts, two_pass.experts)
    cols = ["top1_agreement", "output_kl", "tokens", "predicted_positions"]
    pd.testing.assert_frame_equal(together.summary[cols], two_pass.summary[cols])
    assert two_pass.summary.iloc[0]["record_bytes_per_token"] > 0
    assert list((tmp_path / "scratch").iterdir()) == [], "the record is removed after the run"


def test_model_against_itself_is_exactly_identical(pair: tuple[Inspector, Inspector]) -> None:
    a, _ = pair
    for report in (
        a.compare(a, TEXT, **READ),
        compare_two_pass(lambda: a.loaded, lambda: a.loaded, a.corpus(TEXT, **READ).batches()),
    ):
        layers = report.layers
        for name in ("first_choice_agreement", "topk_overlap", "topk_jaccard", "exact_set_agreement"):
            assert (layers[name] == 1.0).all(), name
        assert (layers["routing_js"] == 0.0).all()
        assert (layers["load_tv"] == 0.0).all()
        assert (layers["load_js"] == 0.0).all()
        assert layers["margin_changed"].isna().all()
        assert (report.experts["share_diff"] == 0).all()
        assert report.summary.iloc[0]["top1_agreement"] == 1.0
        assert report.summary.iloc[0]["output_kl"] == 0.0


def test_ctrl_c_in_second_pass_says_how_far_and_cleans_up(pair: tuple[Inspector, Inspector], tmp_path: Path) -> None:
    a, b = pair

    def progress(phase: str, tokens: int) -> None:
        if phase == "b":
            raise KeyboardInterrupt

    batches = list(a.corpus(TEXT, **READ).batches())
    first, total = batches[0].tokens, sum(batch.tokens for batch in batches)
    expected = rf"model B's pass after 1 of {len(batches)} batches \({first} of {total} tokens\); nothing was written"
    with pytest.raises(Interrupted, match=expected):
        compare_two_pass(
            lambda: a.loaded, lambda: b.loaded, a.corpus(TEXT, **READ).batches(), scratch=tmp_path, progress=progress
        )
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------------------------
# CLI, end to end in a subprocess
# ------------------------------------------------------------------------------------------------------------


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    import os

    return subprocess.run(
        [sys.executable, "-c", "from moe_inspect.cli import main; main()", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, **env},
        timeout=300,
    )


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


def test_cli_4bit_against_unquantized_end_to_end(tiny_dir, corpus_file: Path, tmp_path: Path) -> None:
    pytest.importorskip("bitsandbytes")
    model = str(tiny_dir("mixtral"))
    result = _cli(
        "compare", str(corpus_file), "-m", model, "--against-load-in-4bit", "--seq-len", "16", "--out", "out",
        "--per-token", "out/tokens.csv", cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    layers = pd.read_csv(tmp_path / "out" / "compare_layers.csv")
    assert list(layers.columns) == [
        "layer", "tokens", "first_choice_agreement", "topk_overlap", "topk_jaccard", "exact_set_agreement",
        "weight_overlap", "routing_js", "load_tv", "load_js", "margin_changed", "margin_kept",
    ]
    assert layers["first_choice_agreement"].between(0, 1).all()
    experts = pd.read_csv(tmp_path / "out" / "compare_experts.csv")
    assert list(experts.columns) == [
        "layer", "expert", "count_a", "count_b", "share_a", "share_b", "share_diff", "log2_ratio"
    ]
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run["model_b"]["quantization"] == "4bit-nf4" and run["model_a"]["quantization"] is None
    assert run["compare_summary"]["mode"] == "two-pass"
    tokens = pd.read_csv(tmp_path / "out" / "tokens.csv", keep_default_na=False)
    assert len(tokens) == int(layers["tokens"].sum())
    same = tokens.groupby("layer")["same_set"].mean()
    np.testing.assert_allclose(same.to_numpy(), layers["exact_set_agreement"].to_numpy())
    assert "drifts most" in result.stdout and "bytes per token" in result.stderr


def test_cli_bad_inputs_exit_2_and_write_nothing(tmp_path: Path, corpus_file: Path, tiny_dir) -> None:
    other_tokenizer = Path(shutil.copytree(tiny_dir("mixtral"), tmp_path / "other-tokenizer"))
    tokenizer = AutoTokenizer.from_pretrained(other_tokenizer)
    tokenizer.add_tokens(["<extra>"])  # one more id: same weights, a different vocabulary
    tokenizer.save_pretrained(other_tokenizer)
    model, corpus = str(tiny_dir("mixtral")), str(corpus_file)
    short = tmp_path / "short.txt"
    short.write_text("Routers send tokens to experts.\n", encoding="utf-8")
    cases = {
        "different tokenizers": ([corpus, "-m", model, "--against", str(other_tokenizer)], "different tokenizers"),
        "too short": ([str(short), "-m", model, "--seq-len", "64"], "shorter than one window"),
        "parquet": ([corpus, "-m", model, "--per-token", "out/t.parquet"], "pyarrow"),
    }
    try:
        import pyarrow  # noqa: F401

        del cases["parquet"]
    except ImportError:
        pass
    for name, (args, message) in cases.items():
        result = _cli("compare", *args, "--out", "out", cwd=tmp_path)
        assert result.returncode == 2, (name, result.stderr)
        assert message in result.stderr, (name, result.stderr)
        assert "Traceback" not in result.stderr
        assert not (tmp_path / "out").exists(), name


@pytest.fixture(scope="module")
def four_experts(tiny_dir, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny_dir's Mixtral with 4 experts instead of 8, same tokenizer."""
    from tiny_models import train_tiny_tokenizer
    from transformers import MixtralConfig

    path = tmp_path_factory.mktemp("four")
    config = AutoModelForCausalLM.from_pretrained(tiny_dir("mixtral")).config.to_dict()
    config["num_local_experts"] = 4
    AutoModelForCausalLM.from_config(MixtralConfig(**config)).save_pretrained(path)
    train_tiny_tokenizer().save_pretrained(path)
    return path


def test_different_moe_shapes_name_the_layer(tiny_dir, four_experts: Path, corpus_file: Path, tmp_path: Path) -> None:
    a = moe_inspect.load(str(tiny_dir("mixtral")), device="cpu")
    message = "MoE layer 0 differs: model A has 8 experts, top-2 there and model B (layer 0) has 4 experts, top-2."
    with pytest.raises(compare_mod.UserError, match=re.escape(message)):  # checked once B is loaded
        a.compare({"model": str(four_experts), "device": "cpu"}, TEXT, seq_len=16)
    args = ["-m", str(tiny_dir("mixtral")), "--against", str(four_experts), "--seq-len", "16", "--out", "out"]
    result = _cli("compare", str(corpus_file), *args, cwd=tmp_path)  # checked from the configs, before A runs
    assert result.returncode == 2 and message in result.stderr.replace("\n", " "), result.stderr
    assert "record" not in result.stderr and not (tmp_path / "out").exists()


def test_cli_ctrl_c_in_second_pass_exits_130_and_writes_nothing(
    tiny_dir, corpus_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from moe_inspect.cli import app

    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt

    real = compare_mod.run_b
    monkeypatch.setattr(compare_mod, "run_b", lambda *a, **k: (interrupted(), real(*a, **k)))
    monkeypatch.chdir(tmp_path)
    args = ["compare", str(corpus_file), "-m", str(tiny_dir("mixtral")), "--seq-len", "16", "--batch-size", "2"]
    result = CliRunner().invoke(app, [*args, "--out", "out", "--per-token", "out/t.csv", "--scratch", "scratch"])
    assert result.exit_code == 130, result.output
    assert "model B's pass after 1 of 21 batches (32 of 672 tokens); nothing was written" in result.output
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []
    assert list((tmp_path / "scratch").iterdir()) == []


def test_per_token_parquet_equals_csv(pair: tuple[Inspector, Inspector], tmp_path: Path) -> None:
    pytest.importorskip("pyarrow")
    from moe_inspect.analysis.compare_tokens import PerTokenWriter

    a, b = pair
    frames = []
    for name in ("t.csv", "t.parquet"):
        writer = PerTokenWriter(tmp_path / name, a.tokenizer)
        compare_two_pass(lambda: a.loaded, lambda: b.loaded, a.corpus(TEXT, **READ).batches(), per_token=writer)
        writer.commit()
        frames.append(writer.path)
    csv = pd.read_csv(frames[0], keep_default_na=False)
    parquet = pd.read_parquet(frames[1])
    pd.testing.assert_frame_equal(csv, parquet, check_dtype=False)
    assert len(csv) == len(a.loaded.routers) * sum(batch.tokens for batch in a.corpus(TEXT, **READ).batches())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.csv", "t.parquet"]


def test_terminal_names_the_experts_that_moved_most() -> None:
    from moe_inspect.render.compare import movers

    experts = pd.DataFrame({"layer": [0, 0, 1, 1], "expert": [0, 1, 0, 1], "share_diff": [0.01, -0.01, 0.031, -0.031]})
    assert movers(experts, count=1) == "Load share gained most: L1 e0 +3.10 pp; lost most: L1 e1 -3.10 pp."
    assert movers(experts.assign(share_diff=0.0)) == "Load share gained most: none; lost most: none."


def test_logprobs_at_equals_full_logits_over_several_chunks(tiny_dir) -> None:
    from moe_inspect.analysis.outputs import OutputHead, logprobs_at, predicted_positions, topk_logprobs

    model = AutoModelForCausalLM.from_pretrained(tiny_dir("mixtral")).eval()
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 300, (2, 9), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.inference_mode():
        full = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits.float()
        head = OutputHead(model, chunk_bytes=4 * model.get_output_embeddings().weight.shape[0] * 4)  # 4 per chunk
        decoded = head.decode(ids, mask, positions)
        logprobs = torch.log_softmax(full[predicted_positions(mask)], -1)
        wanted = torch.randint(0, logprobs.shape[-1], (logprobs.shape[0], 5), generator=generator)
        values, rest, top = logprobs_at(head, decoded, wanted)
        torch.testing.assert_close(values, logprobs.gather(-1, wanted), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(rest.exp(), 1 - logprobs.gather(-1, wanted).exp().sum(-1), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(top, logprobs.max(-1).values, rtol=1e-5, atol=1e-5)
        # at a model's own top-k ids it reproduces topk_logprobs bit for bit
        own, own_ids, own_rest, _ = topk_logprobs(head, decoded, 5)
        again, again_rest, _ = logprobs_at(head, decoded, own_ids)
        assert torch.equal(own, again) and torch.equal(own_rest, again_rest)


def test_cli_together_writes_the_same_tables_as_two_pass(tiny_dir, corpus_file: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from moe_inspect.cli import app

    base = ["compare", str(corpus_file), "-m", str(tiny_dir("mixtral")), "--against-dtype", "bfloat16"]
    for name, extra in (("two", []), ("together", ["--together"])):
        result = CliRunner().invoke(app, [*base, "--seq-len", "16", "--out", str(tmp_path / name), *extra])
        assert result.exit_code == 0, result.output
    for table in ("compare_layers.csv", "compare_experts.csv"):
        pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "two" / table), pd.read_csv(tmp_path / "together" / table))
    runs = [json.loads((tmp_path / name / "run.json").read_text()) for name in ("two", "together")]
    assert [run["compare_summary"]["mode"] for run in runs] == ["two-pass", "together"]
    assert runs[0]["model_b"]["dtype"] == "bfloat16" and runs[0]["model_a"]["dtype"] == "float32"


# ------------------------------------------------------------------------------------------------------------
# model B's options: the first model's unless given
# ------------------------------------------------------------------------------------------------------------


def _parsed_options(monkeypatch: pytest.MonkeyPatch, *args: str) -> tuple[LoadOptions, LoadOptions]:
    """What the CLI hands to the comparison for ``args``, without loading anything."""
    from typer.testing import CliRunner

    from moe_inspect.cli import app

    module = sys.modules["moe_inspect.cli.compare"]
    seen: list[tuple[LoadOptions, LoadOptions]] = []
    monkeypatch.setattr(module, "_compare_models", lambda inputs, a, b, *rest: seen.append((a, b)))
    result = CliRunner().invoke(app, ["compare", "corpus.txt", *args])
    assert result.exit_code == 0, result.output
    return seen[0]


def test_against_options_default_to_the_first_models(monkeypatch: pytest.MonkeyPatch) -> None:
    first = ["-m", "org/m", "--dtype", "bfloat16", "--device", "cpu", "--revision", "v1", "--device-map", "auto"]
    a, b = _parsed_options(monkeypatch, *first, "--trust-remote-code", "--against-load-in-4bit")
    assert a == LoadOptions("org/m", "bfloat16", "cpu", "v1", True, "auto", False, False)
    assert b == LoadOptions("org/m", "bfloat16", "cpu", "v1", True, "auto", load_in_4bit=True)  # the example
    # Given options win; another model does not inherit the first's revision.
    a, b = _parsed_options(monkeypatch, *first, "--against", "org/ft", "--against-dtype", "float16")
    assert b == LoadOptions("org/ft", "float16", "cpu", None, False, "auto")
    assert _parsed_options(monkeypatch, "--against-model", "org/ft")[1].model == "org/ft"
    # Quantization is one choice: A's when B names none, else only B's.
    assert _parsed_options(monkeypatch, "--load-in-4bit")[1].load_in_4bit
    b = _parsed_options(monkeypatch, "--load-in-4bit", "--against-load-in-8bit")[1]
    assert (b.load_in_4bit, b.load_in_8bit) == (False, True)


def test_cli_json_is_one_document_on_stdout(tiny_dir, corpus_file: Path, tmp_path: Path) -> None:
    args = ["compare", str(corpus_file), "-m", str(tiny_dir("mixtral")), "--seq-len", "16", "--max-tokens", "64"]
    result = _cli(*args, "--json", "--quiet", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["summary"][0]["first_choice_agreement"] == 1.0  # the model against itself
    assert len(document["layers"]) == len(document["run"]["model_a"]["routers"])
    # --quiet: none of our status lines (imported libraries may still log, e.g. torchao's kernel notes)
    assert not any(word in result.stderr for word in ("record", "routers,", "Wrote", "demo model")), result.stderr
