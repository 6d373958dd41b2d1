"""plan: DeepSeek EPLB against its published example, a per-layer transcription, brute force and invariants."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from engine_record_writers import make_routing, write_rank_dumps

from moe_inspect import metrics
from moe_inspect.analysis.placement import plan_placement, rebalance_experts
from moe_inspect.analysis.plan import LoadSource, gpu_load, run_plan, traffic
from moe_inspect.errors import UserError

ROOT = Path(__file__).resolve().parents[1]

# github.com/deepseek-ai/EPLB README: two layers, 12 experts, 16 replicas, 4 groups, 2 nodes, 8 GPUs
EXAMPLE_WEIGHT = [
    [90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
    [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27],
]
EXAMPLE_PHY2LOG = [
    [5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
    [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1],
]


def test_published_example() -> None:
    phy2log, log2phy, logcnt = rebalance_experts(np.array(EXAMPLE_WEIGHT), 16, 4, 2, 8)
    assert phy2log.tolist() == EXAMPLE_PHY2LOG
    assert logcnt.sum(1).tolist() == [16, 16]
    assert log2phy.shape == (2, 12, 2)


# ---- a literal per-layer transcription of the published description, to check the vectorised version ----


def _pack_one(weights: list[float], packs: int) -> tuple[list[int], list[int]]:
    per = len(weights) // packs
    if per == 1:
        return list(range(len(weights))), [0] * len(weights)
    load, items = [0.0] * packs, [0] * packs
    index, rank = [0] * len(weights), [0] * len(weights)
    for item in sorted(range(len(weights)), key=lambda i: -weights[i]):
        pack = min((p for p in range(packs) if items[p] < per), key=lambda p: load[p])
        index[item], rank[item] = pack, items[pack]
        load[pack] += weights[item]
        items[pack] += 1
    return index, rank


def _replicate_one(weights: list[float], slots: int) -> tuple[list[int], list[int], list[int]]:
    phy, rank, cnt = list(range(len(weights))), [0] * len(weights), [1] * len(weights)
    for _ in range(len(weights), slots):
        hot = max(range(len(weights)), key=lambda e: weights[e] / cnt[e])
        phy.append(hot)
        rank.append(cnt[hot])
        cnt[hot] += 1
    return phy, rank, cnt


def _reference_layer(w: list[float], slots: int, groups: int, nodes: int, gpus: int) -> list[int]:
    """One layer, loops only: groups -> nodes, replicas per node, physical experts -> the node's GPUs."""
    if groups % nodes:
        groups, nodes = 1, 1
    e = len(w)
    size = e // groups
    node_of, rank_of = _pack_one([sum(w[g * size : (g + 1) * size]) for g in range(groups)], nodes)
    placed = [0] * slots
    per_gpu = slots // gpus
    for node in range(nodes):
        members = sorted((g for g in range(groups) if node_of[g] == node), key=lambda g: rank_of[g])
        experts = [g * size + i for g in members for i in range(size)]
        phy, _, cnt = _replicate_one([w[x] for x in experts], slots // nodes)
        loads = [w[experts[m]] / cnt[m] for m in phy]
        gpu_of, pos = _pack_one(loads, gpus // nodes)
        for j, m in enumerate(phy):
            placed[node * (slots // nodes) + gpu_of[j] * per_gpu + pos[j]] = experts[m]
    return placed


@pytest.mark.parametrize(
    ("experts", "slots", "groups", "nodes", "gpus"),
    [(12, 16, 4, 2, 8), (16, 24, 4, 2, 4), (8, 12, 1, 1, 4), (16, 20, 1, 2, 4), (32, 40, 8, 4, 8), (8, 8, 2, 2, 4)],
)
def test_vectorised_equals_per_layer_transcription(
    experts: int, slots: int, groups: int, nodes: int, gpus: int
) -> None:
    rng = np.random.default_rng(experts * slots + nodes)
    weight = rng.gamma(0.7, size=(5, experts)) * 100  # continuous: no ties to break
    phy2log, _, _ = rebalance_experts(weight, slots, groups, nodes, gpus)
    for layer in range(5):
        assert phy2log[layer].tolist() == _reference_layer(weight[layer].tolist(), slots, groups, nodes, gpus)


@pytest.mark.parametrize("policy", ["auto", "global"])
def test_invariants_and_brute_force_loads(policy: str) -> None:
    rng = np.random.default_rng(3)
    weight = rng.integers(0, 1000, size=(6, 16)).astype(float)
    weight[0] = 0  # an all-zero layer still gets a valid placement
    p = plan_placement(weight, num_gpus=4, num_nodes=2, redundant=8, num_groups=4, policy=policy)  # type: ignore[arg-type]
    assert p.policy == ("hierarchical" if policy == "auto" else "global")
    for layer in range(6):
        row = p.phy2log[layer]
        assert set(row.tolist()) == set(range(16))  # every logical expert placed at least once
        assert np.array_equal(np.bincount(row, minlength=16), p.logcnt[layer])
        for e in range(16):
            slots = p.log2phy[layer, e]
            assert (row[slots[slots >= 0]] == e).all() and (slots >= 0).sum() == p.logcnt[layer, e]
        # brute force: each slot carries load / replicas; sum per GPU by hand
        per_gpu = [0.0] * 4
        for slot, e in enumerate(row):
            per_gpu[slot // 6] += weight[layer, e] / p.logcnt[layer, e]
        assert gpu_load(weight, p.phy2log, 4)[layer].tolist() == pytest.approx(per_gpu)
        assert sum(per_gpu) == pytest.approx(weight[layer].sum())  # replicas split the load, none lost
        if weight[layer].sum():
            assert metrics.balancedness(weight[layer], 4, row) == pytest.approx(np.mean(per_gpu) / max(per_gpu))
        if policy == "auto":  # hierarchical: each node holds whole expert groups
            for node in range(2):
                held = set(row[node * 12 : (node + 1) * 12].tolist())
                assert len({e // 4 for e in held}) == 2


def test_placement_beats_contiguous_on_skewed_load() -> None:
    weight = np.array([[1000.0, 10, 10, 10, 10, 10, 10, 10]])
    report = run_plan(LoadSource(weight, [0], 1), num_gpus=4, redundant=4)
    row = report.layers.iloc[0]
    assert row["balancedness_before"] == pytest.approx((1070 / 4) / 1010)  # GPU 0 holds experts 0 and 1
    # expert 0 gets the 4 extra slots (1000/5 = 200 per replica beats 10); 12 slots, 3 per GPU
    assert report.placement.logcnt[0].tolist() == [5, 1, 1, 1, 1, 1, 1, 1]
    after = gpu_load(weight, report.placement.phy2log, 4)[0]
    assert after.sum() == pytest.approx(1070)
    assert row["speedup"] == pytest.approx(1010 / after.max())
    assert row["max_over_mean_after"] == pytest.approx(after.max() / after.mean())
    assert row["max_over_mean_after"] < row["max_over_mean_before"]


def test_deepseek_v3_shape_under_a_second() -> None:
    weight = np.random.default_rng(0).gamma(0.5, size=(58, 256)) * 1000
    for redundant, gpus, nodes in [(64, 64, 8), (32, 32, 4)]:
        started = time.perf_counter()
        p = plan_placement(weight, gpus, nodes, redundant, num_groups=8)
        assert time.perf_counter() - started < 1.0
        assert p.phy2log.shape == (58, 256 + redundant) and p.policy == "hierarchical"
    with pytest.raises(UserError, match="do not split over 64 GPUs"):
        plan_placement(weight, 64, 8, 32, num_groups=8)  # 288 slots: not a multiple of 64
    with pytest.raises(UserError, match="groups to divide"):
        plan_placement(weight, 64, 8, 64, num_groups=3, policy="hierarchical")


def test_traffic_against_a_loop() -> None:
    rng = np.random.default_rng(5)
    weight = rng.gamma(0.5, size=(2, 8)) * 100
    p = plan_placement(weight, num_gpus=4, num_nodes=2, redundant=4, num_groups=2)
    topk = np.stack([np.stack([rng.choice(8, 2, replace=False) for _ in range(2)]) for _ in range(30)])
    topk[3, 1, 1] = -1
    shares = traffic(topk, p, tokens_per_gpu=3, chunk=7)  # chunks that cut through GPU blocks
    whole = traffic(topk, p, tokens_per_gpu=3)
    assert all(np.array_equal(shares[name], whole[name]) for name in whole)
    for layer in range(2):
        cross = {"gb": 0, "ga": 0, "nb": 0, "na": 0}
        total = 0
        for t in range(30):
            src = (t // 3) % 4
            for e in topk[t, layer]:
                if e < 0:
                    continue
                total += 1
                before = e // 2
                gpus = [s // 3 for s in range(12) if p.phy2log[layer, s] == e]
                after = src if src in gpus else next((g for g in gpus if g // 2 == src // 2), gpus[t % len(gpus)])
                cross["gb"] += before != src
                cross["ga"] += after != src
                cross["nb"] += before // 2 != src // 2
                cross["na"] += after // 2 != src // 2
        assert shares["cross_gpu_before"][layer] == pytest.approx(cross["gb"] / total)
        assert shares["cross_gpu_after"][layer] == pytest.approx(cross["ga"] / total)
        assert shares["cross_node_before"][layer] == pytest.approx(cross["nb"] / total)
        assert shares["cross_node_after"][layer] == pytest.approx(cross["na"] / total)


def _sglang_init_by_mapping(path: Path, num_hidden_layers: int, num_logical: int, ep_size: int) -> torch.Tensor:
    """What SGLang's ExpertLocationMetadata.init_by_mapping expects of --init-expert-location."""
    data = json.loads(path.read_text())
    mapping = torch.tensor(data["physical_to_logical_map"])
    assert set(data) == {"physical_to_logical_map"}
    assert mapping.dim() == 2 and mapping.shape[0] == num_hidden_layers
    assert mapping.shape[1] % ep_size == 0 and mapping.shape[1] >= num_logical
    assert int(mapping.min()) >= 0 and int(mapping.max()) < num_logical
    for row in mapping:
        assert set(row.tolist()) == set(range(num_logical))
    return mapping


def test_cli_plan_from_per_token_records_writes_sglang_and_eplb_files(tmp_path: Path) -> None:
    routing = make_routing(layers=5, experts=8, k=2, dense=(0, 1), seq_lens=(9, 6, 11, 7), seed=4)
    files = write_rank_dumps(tmp_path, routing, "per_token", redundant=0)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "COLUMNS": "160"}
    cmd = [sys.executable, "-c", "from moe_inspect.cli import main; main()", "plan", *map(str, files)]
    args = ["--gpus", "4", "--nodes", "2", "--redundant-experts", "4", "--groups", "2", "--out", str(tmp_path / "p")]
    done = subprocess.run([*cmd, *args], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "cross-node" in done.stdout
    mapping = _sglang_init_by_mapping(tmp_path / "p" / "placement.json", 5, 8, 4)
    assert mapping[0].tolist() == (np.arange(12) % 8).tolist()  # dense layers: the trivial map
    saved = torch.load(tmp_path / "p" / "placement.pt", weights_only=True)
    assert saved["phy2log"].shape == (3, 12) and saved["logcnt"].sum(1).tolist() == [12] * 3
    assert torch.equal(mapping[2:], saved["phy2log"])
    assert saved["moe_layers"].tolist() == [2, 3, 4]
    import pandas as pd

    plan_layers = pd.read_csv(tmp_path / "p" / "plan_layers.csv")
    assert plan_layers["layer"].tolist() == [2, 3, 4] and "cross_node_after" in plan_layers.columns
    placement = pd.read_csv(tmp_path / "p" / "placement.csv")
    assert len(placement) == 3 * 12 and placement["node"].max() == 1 and placement["gpu"].max() == 3
    bad = subprocess.run([*cmd, "--gpus", "5"], env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "do not split over 5 GPUs" in bad.stderr


def test_balancedness_with_a_placement_hand_worked() -> None:
    # expert 0 (load 6) has three replicas, each carrying 2: ranks hold {0, 1, 2} = 6 and {0, 3, 0} = 6
    assert metrics.balancedness([6, 2, 2, 2], 2, placement=[0, 1, 2, 0, 3, 0]) == 1.0
    assert metrics.balancedness([6, 2, 2, 2], 2) == pytest.approx(6 / 8)  # contiguous: (8, 4)


def test_plan_from_an_ingest_folder_keeps_the_decoder_layer_count(tmp_path: Path) -> None:
    from engine_record_writers import write_stat

    from moe_inspect.analysis.ingest import record_report
    from moe_inspect.analysis.plan import load_source
    from moe_inspect.io.engine_records import read_records

    routing = make_routing(layers=5, experts=8, k=2, dense=(0, 4))  # a dense last layer too
    record_report(read_records([write_stat(tmp_path / "s.pt", routing)])).write(tmp_path / "ingested")
    source = load_source([tmp_path / "ingested"])
    assert source.moe_layers == [1, 2, 3] and source.num_layers == 5 and source.topk is None
    assert np.array_equal(source.weight, routing.counts[1:4])
    report = run_plan(source, num_gpus=2, redundant=2)
    mapping = report.physical_to_logical_map()
    assert len(mapping) == 5 and mapping[4] == [0, 1, 2, 3, 4, 5, 6, 7, 0, 1]
    assert "cross_gpu_before" not in report.layers.columns  # counts only: no traffic columns
