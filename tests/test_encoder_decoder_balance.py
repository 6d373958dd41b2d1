"""Encoder-decoder balance and generation (issue 17): Switch Transformers and NLLB-MoE.

The measured ``drop_rate`` is checked against drops counted here from the routers' own outputs (hooks on the router
modules, a full forward with the head over the same batches); targets against their token counts; generation
against its row count and a full forward over the generated sequence.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from test_encoder_decoder import folders, inspectors  # noqa: F401  (module fixtures: the tiny checkpoints)
from typer.testing import CliRunner

import moe_inspect
from moe_inspect.cli import app
from moe_inspect.errors import UserError
from moe_inspect.model.capture import capture
from moe_inspect.model.loading import decoder_start_id
from moe_inspect.model.source import demo_model_path

ROOT = Path(__file__).resolve().parents[1]
LINES = [
    "The quick brown fox jumps over the lazy dog again and again",
    "hi",
    "a b c d e f g h i j k l m n o p",
    "x",
    "the lazy dog sleeps while the fox runs",
]
TARGETS = ["le renard", "", "abc def", "z", "le chien dort"]
FAMILIES = ("switch_transformers", "nllb-moe")


def _router_drops(insp, lines: list[str], batch_size: int) -> dict[str, tuple[int, int]]:
    """Per stack (dropped real-token assignments, real tokens), from the router modules' own outputs over a full
    forward (with the LM head) of the same batches balance reads."""
    loaded = insp.loaded
    reader = insp.corpus(lines, lines=True, batch_size=batch_size)
    outputs: dict[str, list] = {"encoder": [], "decoder": []}
    handles = [
        spec.module.register_forward_hook(lambda _m, _a, out, s=spec.stack: outputs[s].append(out))
        for spec in loaded.routers
    ]
    totals = {"encoder": [0, 0], "decoder": [0, 0]}
    start = decoder_start_id(loaded.model.config)
    try:
        for batch in reader.batches():
            for stack in outputs:
                outputs[stack].clear()
            rows = batch.input_ids.shape[0]
            with torch.inference_mode():
                loaded.model(
                    input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                    decoder_input_ids=torch.full((rows, 1), start),
                )
            for stack, real in (("encoder", batch.attention_mask), ("decoder", torch.ones(rows, 1))):
                (out,) = outputs[stack]
                real = real.reshape(-1).bool()
                if loaded.model_type == "switch_transformers":  # dispatch mask after capacity (B, S, E)
                    kept = out[0].reshape(real.numel(), -1).sum(-1)
                    dropped = (1 - kept)[real].sum()
                else:  # NLLB-MoE: combine weights after capacity (T, E), one non-zero per kept assignment
                    kept = (out[1] > 0).sum(-1)
                    dropped = (2 - kept)[real].sum()
                totals[stack][0] += int(dropped)
                totals[stack][1] += int(real.sum())
    finally:
        for handle in handles:
            handle.remove()
    return {stack: (d, t) for stack, (d, t) in totals.items()}


@pytest.mark.parametrize("family", FAMILIES)
def test_measured_drop_rate_equals_the_routers_own_drops(inspectors, family: str) -> None:  # noqa: F811
    insp = inspectors[family]
    k = insp.loaded.routers[0].top_k
    report = insp.balance(LINES, lines=True, batch_size=2)
    truth = _router_drops(insp, LINES, 2)
    layers = report.layers.set_index("stack")
    for stack, (dropped, tokens) in truth.items():
        assert layers.loc[stack, "tokens"] == tokens
        assert round(layers.loc[stack, "drop_rate"] * tokens * k) == dropped
        experts = report.experts[report.experts["stack"] == stack]
        assert round((experts["drop_rate"].fillna(0) * experts["count"]).sum()) == dropped
    assert truth["encoder"][0] > 0, "the long source line must overflow an expert"
    assert report.run["capacity"]["batch_size"] == 2
    assert report.run["decoder_input"] == "start token"


@pytest.mark.parametrize("family", FAMILIES)
def test_a_batch_that_cannot_overflow_drops_nothing(inspectors, family: str) -> None:  # noqa: F811
    insp = inspectors[family]
    short = ["x", "hi", "a"]  # one token each, one sequence per batch: no expert can get two assignments
    assert all(len(insp.tokenizer(line)["input_ids"]) == 1 for line in short)
    quiet = insp.balance(short, lines=True, batch_size=1)
    assert quiet.layers["drop_rate"].tolist() == [0.0, 0.0]
    loud = insp.balance(LINES[:1], lines=True, batch_size=1)
    assert loud.layers.set_index("stack").loc["encoder", "drop_rate"] > 0


def test_stacks_and_per_stack_layers(inspectors, tmp_path: Path) -> None:  # noqa: F811
    report = inspectors["nllb-moe"].balance(LINES, lines=True, batch_size=2)
    assert report.layers[["stack", "layer"]].values.tolist() == [["encoder", 1], ["decoder", 1]]
    assert report.experts.groupby("stack", sort=False).size().to_dict() == {"encoder": 8, "decoder": 8}
    assert set(report.coactivation["stack"]) == {"encoder", "decoder"}
    demo = moe_inspect.load(str(demo_model_path())).balance(LINES, lines=True, max_tokens=40)
    assert set(demo.layers["stack"]) == {"decoder"} and set(demo.experts["stack"]) == {"decoder"}
    assert demo.layers["drop_rate"].isna().all() and demo.experts["drop_rate"].isna().all()
    demo.write(tmp_path / "demo")
    row = (tmp_path / "demo" / "layers.csv").read_text().splitlines()[1].split(",")
    header = (tmp_path / "demo" / "layers.csv").read_text().splitlines()[0].split(",")
    assert row[header.index("drop_rate")] == "" and row[header.index("stack")] == "decoder"


@pytest.mark.parametrize("family", FAMILIES)
def test_targets_are_aligned_line_by_line(inspectors, family: str) -> None:  # noqa: F811
    insp = inspectors[family]
    sources = "\n".join([*LINES[:2], "", *LINES[2:]])  # a blank source line is skipped with its target
    targets = [*TARGETS[:2], "ignored with its blank source", *TARGETS[2:]]
    report = insp.balance(sources, lines=True, batch_size=2, targets=targets)
    want = sum(1 + len(insp.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in TARGETS)
    layers = report.layers.set_index("stack")
    assert layers.loc["decoder", "tokens"] == want
    assert layers.loc["encoder", "tokens"] == sum(len(insp.tokenizer(s)["input_ids"]) for s in LINES)
    assert report.run["decoder_input"] == "targets <targets>"


def test_refusals_in_one_sentence(inspectors, tmp_path: Path) -> None:  # noqa: F811
    insp = inspectors["switch_transformers"]
    with pytest.raises(UserError, match=r"^The target file has 4 lines but the corpus has 5; give one target"):
        insp.balance(LINES, lines=True, targets=TARGETS[:4])
    with pytest.raises(UserError, match=r"^The target file has 6 lines but the corpus has 5;"):
        insp.balance(LINES, lines=True, targets=[*TARGETS, "one more"])
    with pytest.raises(UserError, match=r"^Aligned targets pair lines: measure the corpus one line per sequence"):
        insp.balance(LINES, targets=TARGETS)
    with pytest.raises(UserError, match=r"^Top tokens per expert are counted for decoder-only models only\.$"):
        insp.balance(LINES, lines=True, top_tokens=3)
    with pytest.raises(UserError, match=r"^Aligned targets are only for encoder-decoder models; this one is"):
        moe_inspect.load(str(demo_model_path())).balance(LINES, lines=True, targets=TARGETS)
    with pytest.raises(UserError, match=r"^ablate reads next-token outputs of decoder-only models; encoder-decoders"):
        insp.ablate(LINES, lines=True, top_k=[1])
    with pytest.raises(UserError, match=r"^compare reads next-token outputs of decoder-only models; encoder-decoders"):
        insp.compare(insp, LINES, lines=True)


def test_cli_refuses_targets_before_the_weights_load(folders, tmp_path: Path, monkeypatch) -> None:  # noqa: F811
    def no_load(*_args, **_kwargs):
        raise AssertionError("the weights must not load")

    monkeypatch.setattr(sys.modules["moe_inspect.cli.balance"], "load_for_cli", no_load)
    corpus, targets = tmp_path / "src.txt", tmp_path / "tgt.txt"
    corpus.write_text("\n".join(LINES) + "\n")
    targets.write_text("\n".join(TARGETS[:3]) + "\n")
    runner = CliRunner()
    cases = [
        (["-m", str(folders["nllb-moe"]), "--lines"], "The target file has 3 lines but the corpus has 5"),
        (["-m", str(folders["nllb-moe"]), "--seq-len", "8"], "Aligned targets pair lines"),
        (["-m", str(folders["nllb-moe"])], "Aligned targets pair lines"),  # a corpus shorter than one window
        (["-m", str(demo_model_path()), "--lines"], "Aligned targets are only for encoder-decoder models"),
    ]
    for extra, sentence in cases:
        result = runner.invoke(app, ["balance", str(corpus), "--target-file", str(targets), *extra])
        assert result.exit_code == 2, result.output
        assert sentence in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_routes_every_generated_token(inspectors, family: str) -> None:  # noqa: F811
    insp = inspectors[family]
    loaded = insp.loaded
    k = loaded.routers[0].top_k
    new = 4
    config = loaded.model.config
    start = config.decoder_start_token_id
    if family == "nllb-moe":
        # As the real checkpoints do (start = eos, not pad): NLLB-MoE numbers decoder positions skipping pad ids,
        # so with a pad start its cached steps and a full forward place tokens differently (the model's own quirk).
        config.decoder_start_token_id = insp.tokenizer.eos_token_id
    try:
        _check_generation(insp, k, new)
    finally:
        config.decoder_start_token_id = start


def _check_generation(insp, k: int, new: int) -> None:
    loaded = insp.loaded
    frame = insp.route(LINES[0], generate=new)
    source_tokens = len(insp.tokenizer(LINES[0])["input_ids"])
    encoder, decoder = frame[frame["stack"] == "encoder"], frame[frame["stack"] == "decoder"]
    assert len(encoder) == source_tokens * k
    assert len(decoder) == (1 + new) * k  # one decoder MoE layer: start token + every generated token
    assert decoder["phase"].tolist() == ["prefill"] * k + ["decode"] * (new * k)
    generated = decoder["token_id"].tolist()[k::k]
    assert frame.attrs["generated_text"] == insp.tokenizer.decode(generated)
    # the decode rows' routing equals one forward of the decoder over the whole generated sequence
    ids = torch.tensor([insp.tokenizer(LINES[0])["input_ids"]])
    sequence = torch.tensor([decoder["token_id"].tolist()[::k]])
    with torch.inference_mode(), capture(loaded.routers) as cap:
        loaded.model(input_ids=ids, decoder_input_ids=sequence)
    decoder_spec = next(s for s in loaded.routers if s.stack == "decoder")
    probs = cap.calls[decoder_spec.index][0].probabilities(decoder_spec)
    chosen = cap.calls[decoder_spec.index][0].experts
    torch.testing.assert_close(
        torch.tensor(decoder["probability"].to_numpy()).view(-1, k), probs.gather(1, chosen).double(), rtol=1e-4,
        atol=1e-5,
    )
    sampled = [insp.route(LINES[0], generate=new, temperature=1.0, seed=7) for _ in range(2)]
    assert sampled[0].equals(sampled[1])


def test_cli_balance_end_to_end(folders, tmp_path: Path) -> None:  # noqa: F811
    corpus, targets, out = tmp_path / "src.txt", tmp_path / "tgt.txt", tmp_path / "run"
    corpus.write_text("\n".join(LINES) + "\n")
    targets.write_text("\n".join(TARGETS) + "\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [
            sys.executable, "-c", "from moe_inspect.cli import main; main()", "balance", str(corpus), "-m",
            str(folders["nllb-moe"]), "--lines", "--batch-size", "2", "--target-file", str(targets), "--seed", "3",
            "--out", str(out), "--html", str(tmp_path / "balance.html"),
        ],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "enc 1" in result.stdout and "dec 1" in result.stdout and "dropped" in result.stdout
    layers = pd.read_csv(out / "layers.csv")
    assert layers["stack"].tolist() == ["encoder", "decoder"]
    assert layers["drop_rate"].notna().all()
    run = json.loads((out / "run.json").read_text())
    assert run["capacity"]["second_expert_policy"] == "all" and run["capacity"]["seed"] == 3
    assert run["capacity"]["batch_size"] == 2 and "ceil(0.2" in run["capacity"]["rule"]
    assert run["targets"]["path"] == str(targets)
    assert set(pd.read_csv(out / "experts.csv")["stack"]) == {"encoder", "decoder"}
    page = (tmp_path / "balance.html").read_text()
    assert 'data-layer="enc 1"' in page and 'data-layer="dec 1"' in page and "dropped (measured)" in page


def test_compare_runs_reads_stacks_and_old_folders(inspectors, tmp_path: Path) -> None:  # noqa: F811
    insp = inspectors["switch_transformers"]
    insp.balance(LINES[:3], lines=True).write(tmp_path / "a")
    insp.balance(LINES[3:], lines=True).write(tmp_path / "b")
    report = moe_inspect.compare_runs(tmp_path / "a", tmp_path / "b")
    assert report.layers[["stack", "layer"]].values.tolist() == [["encoder", 1], ["decoder", 1]]
    # a folder written before the stack column: read as decoder layers
    demo = moe_inspect.load(str(demo_model_path()))
    demo.balance(LINES, lines=True).write(tmp_path / "new")
    old = tmp_path / "old"
    demo.balance(LINES[::-1], lines=True).write(old)
    experts = pd.read_csv(old / "experts.csv").drop(columns=["stack", "drop_rate"])
    experts.to_csv(old / "experts.csv", index=False)
    run = json.loads((old / "run.json").read_text())
    for router in run["routers"]:
        router.pop("stack")
    (old / "run.json").write_text(json.dumps(run))
    both = moe_inspect.compare_runs(old, tmp_path / "new")
    assert set(both.layers["stack"]) == {"decoder"} and len(both.layers) == len(demo.loaded.routers)


def test_random_policy_balance_is_repeatable_with_a_seed(inspectors) -> None:  # noqa: F811
    insp = inspectors["nllb-moe"]
    routers = [spec.module for spec in insp.loaded.routers]
    try:
        for router in routers:
            router.second_expert_policy = "random"
        runs = [insp.balance(LINES, lines=True, batch_size=2, seed=seed) for seed in (1, 1, 2, 3)]
    finally:
        for router in routers:
            router.second_expert_policy = "all"
    columns = ["drop_rate", "load_entropy"]
    assert runs[0].layers[columns].equals(runs[1].layers[columns])
    assert runs[0].experts["count"].equals(runs[1].experts["count"])
    assert any(not runs[0].layers[columns].equals(r.layers[columns]) for r in runs[2:])
    assert runs[0].run["capacity"]["second_expert_policy"] == "random" and runs[0].run["capacity"]["seed"] == 1


@pytest.mark.slow
def test_torchrun_two_ranks_equal_one_process(folders, tmp_path: Path) -> None:  # noqa: F811
    """Each batch is routed whole by one rank, so the measured drops (per batch) reduce to one process's exactly."""
    corpus, targets = tmp_path / "src.txt", tmp_path / "tgt.txt"
    corpus.write_text("\n".join(LINES * 2) + "\n")
    targets.write_text("\n".join(TARGETS * 2) + "\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    model = str(folders["nllb-moe"])
    args = ["balance", str(corpus), "-m", model, "--lines", "--batch-size", "2", "--target-file", str(targets)]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    done = subprocess.run(
        [*launcher, "-m", "moe_inspect", *args, "--device", "cpu", "--out", str(tmp_path / "two")],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    one = moe_inspect.load(model, device="cpu").balance(files=[corpus], lines=True, batch_size=2, targets=targets)
    two = pd.read_csv(tmp_path / "two" / "layers.csv")
    assert two["stack"].tolist() == one.layers["stack"].tolist()
    assert two["tokens"].tolist() == one.layers["tokens"].tolist()
    assert two["drop_rate"].to_numpy() == pytest.approx(one.layers["drop_rate"].to_numpy(), rel=1e-12)
    experts = pd.read_csv(tmp_path / "two" / "experts.csv")
    assert experts["drop_rate"].to_numpy() == pytest.approx(one.experts["drop_rate"].to_numpy(), nan_ok=True)
