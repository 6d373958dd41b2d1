"""`ablate` against independent references: reloaded checkpoints with k changed, a checkpoint with an expert
sliced out, balance's capacity what-if, a full backward pass; the model unchanged; bad specs refused."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import moe_inspect
from moe_inspect.analysis.ablate import build_plan
from moe_inspect.errors import UserError

FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3", "olmoe", "gpt_oss"]
TEXTS = [
    "def add(a, b):\n    return a + b\n\nfor i in range(3):\n    print(i, add(i, 2))\n" * 2,
    "The router sends each token to two experts. The expert weighs the hidden state quickly." * 2,
]
LINES = ["def f(a, b): return a * b", "The quick brown fox.", "Each token chooses two experts at random.", "x"]
OPTS = {"seq_len": 24, "batch_size": 2}


def _loss(insp: moe_inspect.Inspector, **kwargs) -> float:
    return float(insp.ablate(TEXTS, **OPTS, **kwargs).ablation.loc[0, "loss"])


def _with_config(src: Path, dst: Path, **changes) -> Path:
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config.update(changes)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize("model_type", FAMILIES)
def test_top_k_equals_the_checkpoint_reloaded_with_k(model_type: str, tiny_dir, tmp_path: Path) -> None:
    insp = moe_inspect.load(str(tiny_dir(model_type)))
    experts = insp.loaded.routers[0].num_experts
    report = insp.ablate(TEXTS, **OPTS, top_k=[1, 3], dense=True)
    losses = dict(zip(report.ablation["setting"], report.ablation["loss"], strict=True))
    for setting, k in (("top-k=1", 1), ("top-k=3", 3), ("dense", experts)):
        reloaded = moe_inspect.load(str(_with_config(tiny_dir(model_type), tmp_path / setting, num_experts_per_tok=k)))
        assert reloaded.loaded.routers[0].top_k == k
        assert losses[setting] == _loss(reloaded), setting  # bit for bit (float32, CPU)
    assert losses["top-k=1"] != losses["baseline"]  # the change does change something


def _sliced_checkpoint(src: Path, dst: Path, expert: int) -> Path:
    """The same checkpoint with ``expert`` deleted from every MoE layer (router rows and expert weights)."""
    model = AutoModelForCausalLM.from_pretrained(src)
    config = model.config
    experts = config.num_local_experts if hasattr(config, "num_local_experts") else config.num_experts
    keep = [e for e in range(experts) if e != expert]
    state = model.state_dict()
    for name, tensor in list(state.items()):
        if (".gate.weight" in name or ".experts." in name) and tensor.shape[0] == experts:
            state[name] = tensor[keep].contiguous()
    config.num_experts = experts - 1  # an attribute_map alias of num_local_experts where that is the field
    sliced = AutoModelForCausalLM.from_config(config)
    sliced.load_state_dict(state)
    sliced.save_pretrained(dst)
    AutoTokenizer.from_pretrained(src).save_pretrained(dst)
    return dst


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe"])
def test_drop_experts_equals_the_sliced_checkpoint(model_type: str, tiny_dir, tmp_path: Path) -> None:
    """Softmax over the remaining experts: renormalising Mixtral, and Qwen2-MoE with its shared expert."""
    insp = moe_inspect.load(str(tiny_dir(model_type)))
    report = insp.ablate(TEXTS, **OPTS, drop_experts=["*:3"])
    sliced = moe_inspect.load(str(_sliced_checkpoint(tiny_dir(model_type), tmp_path / "sliced", 3)))
    assert sliced.loaded.routers[0].num_experts == insp.loaded.routers[0].num_experts - 1
    # Not bit for bit: a softmax over 7 logits and one over 8 with a -inf round differently (4e-7 on Mixtral).
    assert float(report.ablation.loc[1, "loss"]) == pytest.approx(_loss(sliced), rel=1e-6, abs=1e-7)
    assert report.ablation.loc[1, "layers"] == "all"


@pytest.mark.parametrize("model_type", FAMILIES)
@pytest.mark.parametrize("policy", ["position", "probs"])
def test_first_layer_drop_rate_equals_balance(model_type: str, policy: str, tiny_dir) -> None:
    insp = moe_inspect.load(str(tiny_dir(model_type)))
    options = {"lines": True, "batch_size": 3, "seq_len": 32}
    report = insp.ablate(LINES * 3, **options, capacity_factors=[1.0, 0.5], drop_policy=policy)
    balance = insp.balance(LINES * 3, **options, capacity_factors=[1.0, 0.5])
    first = min(spec.layer for spec in insp.loaded.routers)
    expected = balance.layers.set_index("layer").loc[first]
    applied = report.layers[report.layers["layer"] == first].set_index("setting")["drop_rate"]
    assert applied["capacity-factor=1.0"] == pytest.approx(expected["drop_rate_cf1"], abs=1e-12)
    assert applied["capacity-factor=0.5"] == pytest.approx(expected["drop_rate_cf0.5"], abs=1e-12)
    assert applied["capacity-factor=0.5"] > 0
    rows = report.ablation.set_index("setting")
    assert rows.loc["capacity-factor=0.5", "drop_rate"] > 0
    assert rows.loc["capacity-factor=0.5", "delta_loss"] != 0


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _hooks(model: torch.nn.Module) -> int:
    modules = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    return modules + sum(len(getattr(p, "_post_accumulate_grad_hooks", None) or {}) for p in model.parameters())


@pytest.mark.parametrize("model_type", FAMILIES)
def test_the_model_is_unchanged_after_every_setting(model_type: str, tiny_dir) -> None:
    insp = moe_inspect.load(str(tiny_dir(model_type)))
    model = insp.model
    before_state, before_hooks, grads = _state(model), _hooks(model), [p.requires_grad for p in model.parameters()]
    first = _loss(insp)
    insp.ablate(
        TEXTS, **OPTS, top_k=[1], dense=True, drop_experts=["*:0"], capacity_factors=[1.0], importance=True,
        layers=[min(s.layer for s in insp.loaded.routers)], gradients=True,
    )
    assert _loss(insp) == first  # bit for bit
    assert _hooks(model) == before_hooks
    assert [p.requires_grad for p in model.parameters()] == grads
    assert all(p.grad is None for p in model.parameters())
    after = _state(model)
    assert all(torch.equal(after[k], v) for k, v in before_state.items())


def test_importance_equals_single_removals_and_proxies_equal_balance(tiny_dir) -> None:
    insp = moe_inspect.load(str(tiny_dir("mixtral")))
    layer = insp.loaded.routers[1].layer
    report = insp.ablate(TEXTS, **OPTS, importance=True, layers=[layer], drop_experts=[f"{layer}:2", f"{layer}:5"])
    imp = report.importance.set_index("expert")
    rows = report.ablation.set_index("setting")
    assert imp.loc[2, "delta_loss"] == pytest.approx(rows.loc[f"drop-experts={layer}:2", "delta_loss"], abs=1e-12)
    assert imp.loc[5, "delta_loss"] == pytest.approx(rows.loc[f"drop-experts={layer}:5", "delta_loss"], abs=1e-12)
    assert sorted(imp["rank"]) == list(range(1, 9))
    assert imp["rank"].idxmin() == imp["delta_loss"].idxmax()
    balance = insp.balance(TEXTS, **OPTS)
    experts = balance.experts[balance.experts["layer"] == layer].set_index("expert")
    assert imp["frequency"].to_numpy() == pytest.approx(experts["token_share"].to_numpy(), rel=1e-12)
    assert imp["mean_weight"].to_numpy() == pytest.approx(experts["mean_weight"].to_numpy(), rel=1e-5)
    assert (imp["output_norm_saliency"] > 0).all()
    assert set(report.spearman.columns) == {"layer", "frequency", "mean_weight", "output_norm_saliency"}


def test_output_norm_saliency_by_brute_force(tiny_dir) -> None:
    """weight x ||expert output||, with the expert's output computed by hand from its fused weights."""
    insp = moe_inspect.load(str(tiny_dir("mixtral")))
    spec = insp.loaded.routers[0]
    report = insp.ablate(TEXTS[:1], seq_len=24, batch_size=1, max_tokens=24, importance=True, layers=[spec.layer])
    experts = insp.model.get_submodule(spec.path.rsplit(".", 1)[0]).experts
    seen: dict[str, torch.Tensor] = {}
    handle = experts.register_forward_pre_hook(lambda _m, args: seen.setdefault("args", args))
    reader = insp.corpus(TEXTS[:1], seq_len=24, batch_size=1, max_tokens=24)
    batch = next(reader.batches())
    with torch.inference_mode():
        insp.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    handle.remove()
    hidden, index, weights = seen["args"]
    sums = torch.zeros(spec.num_experts, dtype=torch.float64)
    counts = torch.zeros(spec.num_experts, dtype=torch.float64)
    for t in range(hidden.shape[0]):
        for r in range(index.shape[1]):
            e = int(index[t, r])
            gate, up = torch.nn.functional.linear(hidden[t], experts.gate_up_proj[e]).chunk(2)
            out = torch.nn.functional.linear(experts.act_fn(gate) * up, experts.down_proj[e])
            sums[e] += float(weights[t, r]) * float(out.float().norm())
            counts[e] += 1
    expected = torch.where(counts > 0, sums / counts.clamp_min(1), 0).numpy()
    assert report.importance["output_norm_saliency"].to_numpy() == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("model_type", ["mixtral", "gpt_oss"])
def test_gradients_equal_a_full_backward(model_type: str, tiny_dir) -> None:
    insp = moe_inspect.load(str(tiny_dir(model_type)))
    report = insp.ablate(TEXTS[:1], seq_len=24, batch_size=1, max_tokens=24, gradients=True)
    batch = next(insp.corpus(TEXTS[:1], seq_len=24, batch_size=1, max_tokens=24).batches())
    model = insp.model
    model.requires_grad_(True)  # the loader freezes everything; the reference takes every gradient
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.input_ids)
    out.loss.backward()
    grads = report.gradients
    for spec in insp.loaded.routers:
        experts = model.get_submodule(spec.path.rsplit(".", 1)[0]).experts
        squares = sum(p.grad.pow(2).reshape(spec.num_experts, -1).sum(1) for p in experts.parameters())
        got = grads[grads["layer"] == spec.layer]["grad_norm"].to_numpy()
        assert got == pytest.approx(squares.sqrt().numpy(), rel=1e-4)
    model.zero_grad(set_to_none=True)
    model.requires_grad_(False)
    counts = insp.balance(TEXTS[:1], seq_len=24, batch_size=1, max_tokens=24).experts
    assert grads["tokens"].tolist() == counts["count"].tolist()


@pytest.mark.parametrize(
    ("options", "sentence"),
    [
        ({"drop_experts": ["9:0"]}, "Layer 9 does not exist: the model has 3 layers (0-2)."),
        ({"drop_experts": ["1:99"]}, "Expert 99 does not exist: layer 1 has 8 experts (0-7)."),
        ({"drop_experts": ["0:1"]}, "Layer 0 is a dense layer: it has no experts to remove."),
        ({"drop_experts": ["1"]}, "'1' is not LAYER:EXPERT (for example 5:0 or *:3)."),
        ({"top_k": [0]}, "`top_k` must be between 1 and the number of experts (8); got 0."),
        ({"top_k": [9]}, "`top_k` must be between 1 and the number of experts (8); got 9."),
        ({"capacity_factors": [0.0]}, "A capacity factor must be positive; got 0.0."),
        ({"importance": True, "layers": [0]}, "Layer 0 is a dense layer: it has no experts to rank."),
        ({"drop_experts": [",".join(f"1:{e}" for e in range(7))]}, "Layer 1 would keep 1 experts"),
    ],
)
def test_bad_specs_are_refused_before_any_pass(options: dict, sentence: str, tiny_dir) -> None:
    insp = moe_inspect.load(str(tiny_dir("deepseek_v3")))  # layer 0 dense, layers 1-2 MoE
    calls = []
    handle = insp.model.register_forward_pre_hook(lambda *_: calls.append(1))
    with pytest.raises(UserError) as caught:
        insp.ablate(TEXTS, **OPTS, **options)
    handle.remove()
    assert str(caught.value).startswith(sentence)
    assert not calls


def test_a_family_whose_selection_cannot_be_changed_is_named(tiny_dir) -> None:
    insp = moe_inspect.load(str(tiny_dir("dbrx")))
    with pytest.raises(UserError, match="cannot change the routing of the dbrx family"):
        build_plan(insp.loaded, top_k=[1])
    assert insp.ablate(TEXTS, **OPTS).ablation["setting"].tolist() == ["baseline"]  # baseline alone still works


def test_cli_writes_the_tables_and_refuses_bad_specs(tiny_dir, tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(TEXTS * 2))
    env_cmd = [sys.executable, "-c", "from moe_inspect.cli import main; main()", "ablate", str(corpus)]
    model = ["-m", str(tiny_dir("mixtral")), "--seq-len", "24", "--batch-size", "2"]
    root = str(Path(__file__).resolve().parents[1])
    env = {"PYTHONPATH": root, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PATH": "/usr/bin:/bin", "COLUMNS": "120"}
    bad = subprocess.run([*env_cmd, *model, "--drop-experts", "9:0"], capture_output=True, text=True, env=env)
    assert bad.returncode == 2
    assert "Layer 9 does not exist" in bad.stderr and "Traceback" not in bad.stderr
    for option, value, sentence in (
        ("--top-k", "0", "top-k must be at least 1; got 0."),
        ("--drop-experts", "3-1", "'3-1' is not LAYER:EXPERT"),
        ("--capacity-factor", "0", "A capacity factor must be positive; got 0.0."),
    ):  # refused before the model loads: no status line about it
        early = subprocess.run([*env_cmd, *model, option, value], capture_output=True, text=True, env=env)
        assert early.returncode == 2 and sentence in early.stderr and "routers" not in early.stderr, early.stderr
    out = tmp_path / "out"
    args = ["--top-k", "1", "--capacity-factor", "1.0", "--importance", "--layers", "1", "--gradients"]
    args += ["--out", str(out)]
    good = subprocess.run([*env_cmd, *model, *args], capture_output=True, text=True, env=env)
    assert good.returncode == 0, good.stderr
    assert "Cost: 12 decoder passes per batch" in good.stderr
    import pandas as pd

    from moe_inspect.io import schemas

    for name, schema in (
        ("ablation", schemas.ABLATION), ("ablation_layers", schemas.ABLATION_LAYERS),
        ("importance", schemas.IMPORTANCE), ("gradients", schemas.GRADIENTS),
    ):
        frame = pd.read_csv(out / f"{name}.csv", keep_default_na=False)
        assert list(frame.columns) == schema.names
    ablation = pd.read_csv(out / "ablation.csv", keep_default_na=False)
    assert ablation["setting"].tolist() == ["baseline", "top-k=1", "capacity-factor=1.0"]
    assert "top-k=1" in good.stdout and "Expert importance" in good.stdout
    assert json.loads((out / "run.json").read_text())["passes_per_batch"] == 12


def test_ctrl_c_keeps_the_completed_batches(tiny_dir) -> None:
    """Interrupted in the middle of the second batch: the figures are the first batch's, for every setting."""
    insp = moe_inspect.load(str(tiny_dir("mixtral")))
    full = insp.ablate(TEXTS, seq_len=24, batch_size=1, max_tokens=24, top_k=[1, 3])
    calls: list[tuple[int, int]] = []

    def interrupt(_batch, done: int, of: int) -> None:
        calls.append((done, of))
        if len(calls) == 3:  # batch 1: (2, 3), (3, 3) done; batch 2: Ctrl-C after its second pass
            raise KeyboardInterrupt

    report = insp.ablate(TEXTS, seq_len=24, batch_size=1, top_k=[1, 3], progress=interrupt)
    assert calls[:3] == [(2, 3), (3, 3), (2, 3)]
    assert report.partial and report.run["batches"] == 1
    assert report.ablation["loss"].tolist() == full.ablation["loss"].tolist()


@pytest.mark.parametrize("stop", ["capacity pass", "gradient pass"])
def test_ctrl_c_inside_a_pass_keeps_exactly_the_finished_batches(stop: str, tiny_dir) -> None:
    """Ctrl-C inside the last router in a later pass of batch 2: every table equals a clean run over batch 1.

    Batch 2's earlier passes did run (drop counts of top-k=1, importance proxies, and before the gradient pass
    every removal); none of it may count (caught: committing the proxies' sums in their hook).
    """
    insp = moe_inspect.load(str(tiny_dir("mixtral")))
    last = insp.loaded.routers[-1]
    options = {
        "seq_len": 24, "batch_size": 1, "top_k": [1], "capacity_factors": [1.0], "importance": True,
        "layers": [last.layer], "gradients": True,
    }
    passes = 1 + 2 + last.num_experts + 1  # baseline, two settings, one removal per expert, forward-backward
    calls = {"n": 0, "at": passes + (3 if stop == "capacity pass" else passes)}

    def ctrl_c(_module, _args, _out) -> None:
        calls["n"] += 1
        if calls["n"] == calls["at"]:
            raise KeyboardInterrupt

    handle = last.module.register_forward_hook(ctrl_c)
    try:
        partial = insp.ablate(TEXTS, **options)
    finally:
        handle.remove()
    assert calls["n"] == calls["at"]
    clean = insp.ablate(TEXTS, **options, max_tokens=24)
    assert partial.partial and not clean.partial
    assert partial.run["batches"] == clean.run["batches"] == 1
    assert partial.run["predicted_tokens"] == clean.run["predicted_tokens"]
    for name in ("ablation", "layers", "importance", "gradients", "spearman"):
        pd.testing.assert_frame_equal(getattr(partial, name), getattr(clean, name), obj=name)
    assert partial.layers["tokens"].tolist() == [24] * len(partial.layers)  # one batch of 24 real tokens


def test_cli_json_is_one_document_and_quiet_prints_nothing(tiny_dir, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from moe_inspect.cli import app

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(TEXTS * 2))
    args = ["ablate", str(corpus), "-m", str(tiny_dir("mixtral")), "--seq-len", "24", "--top-k", "1", "--json", "-q"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert result.stderr == ""  # no load line, no cost line, no progress
    data = json.loads(result.stdout)
    assert set(data) == {"run", "ablation", "ablation_layers", "importance", "gradients"}
    assert [row["setting"] for row in data["ablation"]] == ["baseline", "top-k=1"]
    assert data["ablation"][0]["tokens"] == data["run"]["predicted_tokens"] > 0
    assert data["importance"] is None and data["gradients"] is None
    assert data["run"]["mode"] == "packed" and data["run"]["corpus"][0]["path"] == str(corpus)
