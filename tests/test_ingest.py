"""ingest: SGLang / vLLM routing records written here exactly as the engines write them, read back as counts."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from engine_record_writers import (
    make_routing,
    request_arrays,
    write_csvs,
    write_jsonl,
    write_rank_dumps,
    write_stat,
)

from moe_inspect.analysis.ingest import _pair_counts, record_report
from moe_inspect.errors import UserError
from moe_inspect.io.engine_records import read_records

ROOT = Path(__file__).resolve().parents[1]
ROUTING = make_routing(layers=4, experts=8, k=2, dense=(0,), dead=7)
ABSENT = ["router_entropy", "top1_prob", "aux_loss", "switch_loss", "z_loss", "repeat_first", "null_share"]


def _direct_repeat_any(routing, layer: int) -> float:
    hits = pairs = 0
    for s in np.unique(routing.sequence):
        ids = routing.ids[routing.sequence == s, layer]
        for a, b in itertools.pairwise(ids):
            hits += bool(set(a) & set(b))
            pairs += 1
    return hits / pairs


def _direct_drop(routing, layer: int, cf: float) -> float:
    dropped = 0
    for p in np.unique(routing.passes):
        ids = routing.ids[routing.passes == p, layer]
        n = np.bincount(ids.reshape(-1), minlength=routing.num_experts)
        cap = int(np.ceil(cf * ids.size / routing.num_experts - 1e-9))
        dropped += np.clip(n - cap, 0, None).sum()
    return dropped / routing.ids[:, layer].size


def test_stat_ring_buffer_dense_layer_and_absent_columns(tmp_path: Path) -> None:
    # 2 passes into a buffer of 4 rows: two rows are never written and must be skipped; layer 0 is dense
    record = read_records([write_stat(tmp_path / "stat.pt", ROUTING, buffer_size=4)])
    assert record.format == "sglang-stat"
    assert np.array_equal(record.counts, ROUTING.counts)
    assert record.dense_layers == [0] and record.batch_counts.shape[0] == 2
    report = record_report(record, (1.0, 2.0))
    assert report.layers["layer"].tolist() == [1, 2, 3]  # the dense layer is marked, not reported as 8 dead experts
    assert report.run["dense_layers"] == [0]
    assert report.layers["dead_experts"].tolist() == [1, 1, 1]  # expert 7 never chosen
    for column in [*ABSENT, "tokens", "top_k", "repeat_any"]:
        assert column not in report.layers.columns
    assert "first_choice" not in report.experts.columns and "token_share" not in report.experts.columns
    assert report.coactivation is None
    share = ROUTING.counts[2] / ROUTING.counts[2].sum()
    assert np.allclose(report.experts.query("layer == 2")["share"], share)
    for cf in (1.0, 2.0):
        assert report.layers[f"drop_rate_cf{cf:g}"].tolist() == pytest.approx(
            [_direct_drop(ROUTING, layer, cf) for layer in (1, 2, 3)]
        )


def test_stat_2d_and_several_dumps_are_summed(tmp_path: Path) -> None:
    first = write_stat(tmp_path / "a.pt", ROUTING)
    torch.save({"logical_count": torch.from_numpy(ROUTING.counts).int(), "extra_fork_key": 1}, tmp_path / "b.pt")
    record = read_records([first, tmp_path / "b.pt"])
    assert np.array_equal(record.counts, 2 * ROUTING.counts)


def test_per_pass_rank_files_with_redundant_experts(tmp_path: Path) -> None:
    files = write_rank_dumps(tmp_path, ROUTING, "per_pass", redundant=3, ranks=2)
    record = read_records(files)
    assert record.format == "sglang-per-pass"
    assert record.physical_to_logical.shape == (4, 11)
    assert np.array_equal(record.counts, ROUTING.counts)  # physical slots 8-10 folded back onto experts 0-2
    assert record.batch_counts.shape[0] == 2  # forward passes summed over ranks
    stat = record_report(read_records([write_stat(tmp_path / "s.pt", ROUTING)]))
    assert record_report(record).layers.equals(stat.layers)


def test_per_token_rank_files(tmp_path: Path) -> None:
    files = write_rank_dumps(tmp_path, ROUTING, "per_token", redundant=2, ranks=2)
    record = read_records(files)
    assert record.format == "sglang-per-token" and record.top_k == 2  # 8 slots, -1 padded
    assert np.array_equal(record.counts, ROUTING.counts)
    report = record_report(record, (1.25,))
    layers = report.layers.set_index("layer")
    assert layers["tokens"].tolist() == [len(ROUTING.ids)] * 3
    for layer in (1, 2, 3):
        assert layers.loc[layer, "repeat_any"] == pytest.approx(_direct_repeat_any(ROUTING, layer))
        assert layers.loc[layer, "drop_rate_cf1.25"] == pytest.approx(_direct_drop(ROUTING, layer, 1.25))
    assert "repeat_first" not in layers.columns  # SGLang's top-k slots are not sorted by weight
    hits, pairs = _pair_counts(record.topk, record.sequence, chunk=3)  # chunks cutting through sequences
    assert hits.tolist() == _pair_counts(record.topk, record.sequence)[0].tolist()
    assert pairs == len(ROUTING.ids) - len(np.unique(ROUTING.sequence))
    co = report.coactivation.query("layer == 3")
    ids = ROUTING.ids[:, 3]
    for _, row in co.iterrows():
        both = ((ids == row.expert_a).any(1) & (ids == row.expert_b).any(1)).sum()
        assert row["count"] == both
    assert co["count"].sum() == len(ids) * 2  # k*(k-1) ordered pairs per token


def test_tensor_parallel_duplicate_ranks_count_once(tmp_path: Path) -> None:
    (tmp_path / "r").mkdir()
    files = write_rank_dumps(tmp_path / "r", ROUTING, "per_token", ranks=1)
    copy = tmp_path / "r" / "expert_distribution_recorder_1732500000_1.pt"
    copy.write_bytes(files[0].read_bytes())
    record = read_records([files[0], copy])
    assert np.array_equal(record.counts, ROUTING.counts)


def test_old_csvs_are_summed_over_ranks(tmp_path: Path) -> None:
    record = read_records(write_csvs(tmp_path, ROUTING, ranks=2))
    assert record.format == "sglang-csv"
    # expert 7 is dead and absent from the CSV: E is the largest id + 1, said in the notes
    assert np.array_equal(record.counts, ROUTING.counts[:, :7])
    assert any("largest expert id" in note for note in record.notes)


@pytest.mark.parametrize("container", ["npy", "npz", "vllm-jsonl", "sglang-jsonl"])
def test_routed_experts_arrays(tmp_path: Path, container: str) -> None:
    arrays = request_arrays(ROUTING, dense_fill=0)
    extra: dict = {"experts": 8}
    if container == "npy":
        path = tmp_path / "one.npy"
        np.save(path, arrays[0])
        expected = make_routing_subset(arrays[:1])
    elif container == "npz":
        path = tmp_path / "many.npz"
        np.savez(path, *arrays)
        expected = ROUTING.counts
    else:
        path = write_jsonl(tmp_path / "routed.jsonl", arrays, raw=container == "sglang-jsonl")
        expected = ROUTING.counts
        if container == "sglang-jsonl":
            extra.update(layers=4, top_k=2)
    record = read_records([path], **extra)
    formats = {"npy": "routed-experts", "npz": "routed-experts", "vllm-jsonl": "vllm-routed"}
    assert record.format == formats.get(container, "sglang-routed")
    assert np.array_equal(record.counts, expected)
    assert record.dense_layers == [0]  # zeros in every slot of layer 0: dense, not 'expert 0 twice'
    if container != "npy":
        report = record_report(record)
        assert report.layers.set_index("layer").loc[2, "repeat_any"] == pytest.approx(_direct_repeat_any(ROUTING, 2))


def make_routing_subset(arrays: list[np.ndarray]) -> np.ndarray:
    ids = np.concatenate(arrays).astype(np.int64)
    counts = np.zeros((ids.shape[1], 8), dtype=np.int64)
    for layer in range(1, ids.shape[1]):
        counts[layer] = np.bincount(ids[:, layer].reshape(-1), minlength=8)
    return counts


def _refused(call) -> str:
    with pytest.raises(UserError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message and message.endswith(".")
    return message


def test_contradictory_records_are_refused(tmp_path: Path) -> None:
    arrays = request_arrays(ROUTING)
    raw = write_jsonl(tmp_path / "raw.jsonl", arrays, raw=True)
    assert "declare" in _refused(lambda: read_records([raw]))
    assert "whole number" in _refused(lambda: read_records([raw], layers=3, top_k=2))
    np.save(tmp_path / "a.npy", arrays[0])
    assert "not the 3 declared" in _refused(lambda: read_records([tmp_path / "a.npy"], top_k=3))
    assert "only 5 experts" in _refused(lambda: read_records([tmp_path / "a.npy"], experts=5))
    twice = arrays[1].copy()
    twice[0, 2] = [3, 3]
    np.save(tmp_path / "twice.npy", twice)
    assert "same expert twice" in _refused(lambda: read_records([tmp_path / "twice.npy"]))
    stat = write_stat(tmp_path / "stat.pt", ROUTING)
    assert "multiple of the declared top-k 3" in _refused(lambda: read_records([stat], top_k=3))
    assert "mix formats" in _refused(lambda: read_records([stat, tmp_path / "a.npy"]))
    (tmp_path / "r").mkdir()
    files = write_rank_dumps(tmp_path / "r", ROUTING, "per_pass", redundant=2)
    other = torch.load(files[1], weights_only=True)
    other["last_physical_to_logical_map"][:, -1] = 5
    torch.save(other, files[1])
    assert "differently" in _refused(lambda: read_records(files))
    (tmp_path / "t").mkdir()
    files = write_rank_dumps(tmp_path / "t", ROUTING, "per_token", ranks=1)
    bad = torch.load(files[0], weights_only=True)
    bad["records"][0]["input_ids"] = bad["records"][0]["input_ids"][:-1]
    torch.save(bad, files[0])
    assert "expected [4" in _refused(lambda: read_records(files))


def test_cli_writes_only_supported_columns_and_refuses_in_one_line(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "COLUMNS": "120"}
    cmd = [sys.executable, "-c", "from moe_inspect.cli import main; main()", "ingest"]
    files = write_rank_dumps(tmp_path, ROUTING, "per_token")
    done = subprocess.run(
        [*cmd, *map(str, files), "--out", str(tmp_path / "out")], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "dense layers (no router): 0" in done.stdout
    layers = pd.read_csv(tmp_path / "out" / "layers.csv")
    assert "router_entropy" not in layers.columns and "repeat_any" in layers.columns
    assert (tmp_path / "out" / "coactivation.csv").exists()
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run["dense_layers"] == [0] and run["format"] == "sglang-per-token"
    stat = write_stat(tmp_path / "stat.pt", ROUTING)
    bad = subprocess.run([*cmd, str(stat), "--top-k", "3"], env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().startswith("Error:") and "top-k 3" in bad.stderr


def test_format_override_and_unknown_format(tmp_path: Path) -> None:
    stat = write_stat(tmp_path / "stat.pt", ROUTING)
    assert read_records([stat], format="sglang-stat").format == "sglang-stat"
    assert "not an SGLang per_pass" in _refused(lambda: read_records([stat], format="sglang-per-pass"))
    assert "Unknown record format" in _refused(lambda: read_records([stat], format="trtllm"))


def test_terminal_report_leaves_absent_columns_out(tmp_path: Path) -> None:
    from rich.console import Console

    from moe_inspect.render.balance import render_balance

    console = Console(record=True, width=200)
    render_balance(record_report(read_records([write_stat(tmp_path / "s.pt", ROUTING)])), console)
    text = console.export_text()
    assert "load H" in text and "drop@1.25" in text
    assert "rtr H" not in text and "aux" not in text  # no router probabilities in a stat dump
    assert "sglang-stat: 114 assignments in 2 × forward pass from 1 file(s); dense layers (no router): 0" in text


def test_cli_house_output_json_quiet_and_one_set_of_files(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from moe_inspect.cli import app
    from moe_inspect.cli.ingest import RECORD_FORMATS
    from moe_inspect.io.engine_records import FORMATS

    assert RECORD_FORMATS == FORMATS  # --format's choices are the readers' formats
    runner = CliRunner()
    tokens = write_rank_dumps(tmp_path, ROUTING, "per_token")
    out = tmp_path / "out"
    done = runner.invoke(app, ["ingest", *map(str, tokens), "--out", str(out), "--json"])
    assert done.exit_code == 0, done.output
    doc = json.loads(done.stdout)  # one JSON document on stdout, nothing else
    assert doc["run"]["format"] == "sglang-per-token" and doc["coactivation"]
    assert {row["layer"] for row in doc["layers"]} == {1, 2, 3} and "router_entropy" not in doc["layers"][0]
    assert f"Wrote {out}" in done.stderr and (out / "coactivation.csv").exists()
    # A count record written into the same folder replaces the set: no stale coactivation.csv is carried over.
    (out / "notes.txt").write_text("mine")
    stat = write_stat(tmp_path / "stat.pt", ROUTING)
    quiet = runner.invoke(app, ["ingest", str(stat), "--out", str(out), "-q"])
    assert quiet.exit_code == 0 and quiet.stdout == "" and quiet.stderr == ""
    assert sorted(p.name for p in out.iterdir()) == ["experts.csv", "layers.csv", "notes.txt", "run.json"]
    assert json.loads((out / "run.json").read_text())["format"] == "sglang-stat"
    # Raw int32 routed experts name the CLI's flags in the CLI, the API's arguments in Python.
    raw = write_jsonl(tmp_path / "raw.jsonl", request_arrays(ROUTING), raw=True)
    assert "`layers` and `top_k`" in _refused(lambda: read_records([raw], format="sglang-routed"))
    refused = runner.invoke(app, ["ingest", str(raw), "--format", "sglang-routed"])
    assert refused.exit_code == 2 and "declare --layers and --top-k" in refused.stderr
    # A file where --out wants a folder is refused before anything is read.
    clash = runner.invoke(app, ["ingest", str(stat), "--out", str(stat)])
    assert clash.exit_code == 2 and "is a file, not a folder" in clash.stderr


def test_cli_plan_json_and_quiet(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from moe_inspect.cli import app

    stat = write_stat(tmp_path / "stat.pt", ROUTING)
    args = ["plan", str(stat), "--gpus", "2", "--redundant-experts", "2"]
    done = CliRunner().invoke(app, [*args, "--json"])
    assert done.exit_code == 0, done.output
    doc = json.loads(done.stdout)
    assert len(doc["physical_to_logical_map"]) == 4 and len(doc["physical_to_logical_map"][1]) == 10
    assert [row["layer"] for row in doc["layers"]] == [1, 2, 3] and doc["run"]["gpus"] == 2
    quiet = CliRunner().invoke(app, [*args, "-q", "--out", str(tmp_path / "p")])
    assert quiet.exit_code == 0 and quiet.stdout == "" and quiet.stderr == ""
    assert (tmp_path / "p" / "placement.json").exists()
