"""`plan`: an EPLB placement from measured load, what it does to per-GPU load and all-to-all traffic, and its files.

Load comes from a ``balance``/``ingest`` output folder (experts.csv) or any record ``ingest`` reads. "Before" is
the engines' default: experts placed contiguously, no replicas. Traffic needs per-token records: each token
starts on a GPU (``tokens_per_gpu`` consecutive tokens per GPU, round-robin over GPUs) and is dispatched to each of
its k experts; after placement it uses the replica on its own GPU, else on its own node, else replicas in turn
(SGLang's static dispatch prefers the same GPU, then the same node).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from moe_inspect import metrics
from moe_inspect.analysis.placement import Placement, Policy, plan_placement
from moe_inspect.errors import UserError
from moe_inspect.io import schemas
from moe_inspect.io.engine_records import read_records
from moe_inspect.io.export import replace_folder, write_csv, write_json, write_torch


@dataclass
class LoadSource:
    """Logical expert load per MoE layer, where those layers sit, and (per-token records) every token's ids."""

    weight: np.ndarray  # [L_moe, E]
    moe_layers: list[int]
    num_layers: int  # decoder layers as SGLang indexes them (dense ones included)
    topk: np.ndarray | None = None  # [N, L_moe, k] logical ids, -1 unused
    description: str = ""


def load_source(
    paths: list[Path],
    num_layers: int | None = None,
    format: str = "auto",
    layers: int | None = None,
    top_k: int | None = None,
    experts: int | None = None,
) -> LoadSource:
    """A balance/ingest output folder, or record files read as ``ingest`` reads them."""
    if len(paths) == 1 and paths[0].is_dir():
        return _from_folder(paths[0], num_layers)
    record = read_records(paths, format, layers, top_k, experts)
    dense = set(record.dense_layers)
    moe = [i for i in range(record.num_layers) if i not in dense]
    topk = None if record.topk is None else record.topk[:, moe]
    total = num_layers or record.num_layers
    if total < record.num_layers:
        raise UserError(f"The record has {record.num_layers} layers, more than the {total} declared.")
    return LoadSource(record.counts[moe].astype(np.float64), moe, total, topk, f"{record.format} record")


def _from_folder(folder: Path, num_layers: int | None) -> LoadSource:
    path = folder / "experts.csv"
    if not path.is_file():
        raise UserError(f"{folder} has no experts.csv: pass a balance or ingest output folder, or record files.")
    frame = pd.read_csv(path, keep_default_na=False)
    if not {"layer", "expert", "count"} <= set(frame.columns):
        raise UserError(f"{path} lacks the layer, expert and count columns.")
    if "stack" in frame.columns and (frame["stack"] == "encoder").any():
        raise UserError(f"{path} is an encoder-decoder's balance; plan places the experts of decoder-only models.")
    if "router" in frame.columns:
        frame = frame[frame["router"] == "mlp"]  # JetMoE's attention routers are not expert-parallel MLPs
    grid = frame.pivot_table(index="layer", columns="expert", values="count", aggfunc="sum", fill_value=0)
    run_file = folder / "run.json"
    run = json.loads(run_file.read_text()) if run_file.is_file() else {}
    moe = [int(x) for x in grid.index]
    total = num_layers or run.get("num_layers") or max(moe) + 1
    if total <= max(moe):
        raise UserError(f"{folder} has layer {max(moe)}, beyond the {total} layers declared.")
    experts = int(grid.columns.max()) + 1
    weight = grid.reindex(columns=range(experts), fill_value=0).to_numpy(dtype=np.float64)
    return LoadSource(weight, moe, int(total), None, f"{folder}")


def gpu_load(weight: np.ndarray, phy2log: np.ndarray, num_gpus: int) -> np.ndarray:
    """[L, G] load per GPU when each replica takes an equal share of its expert's load (slots contiguous)."""
    layers, experts = weight.shape
    rows = np.arange(layers)[:, None]
    replicas = np.zeros((layers, experts))
    np.add.at(replicas, (rows, phy2log), 1)
    slot = weight[rows, phy2log] / replicas[rows, phy2log]
    return slot.reshape(layers, num_gpus, -1).sum(-1)


def contiguous_gpu(num_experts: int, num_gpus: int) -> np.ndarray:
    """GPU of each expert without EPLB: contiguous blocks (E/G each when G divides E)."""
    return np.arange(num_experts) * num_gpus // num_experts


def _dispatch_gpu(topk: np.ndarray, placement: Placement, source: np.ndarray, first: int = 0) -> np.ndarray:
    """[N, L, k] destination GPU of every dispatch after placement: own GPU, else own node, else in turn.

    ``first`` is the index of the first token (replicas are taken in turn by token index).
    """
    layers = np.arange(topk.shape[1])[None, :, None]
    replicas = placement.log2phy[layers, topk.clip(min=0)]  # [N, L, k, R]
    gpu = np.where(replicas >= 0, replicas // placement.slots_per_gpu, -1)
    src = source[:, None, None, None]
    per_node = placement.gpus_per_node
    same_gpu = gpu == src
    same_node = (gpu >= 0) & (gpu // per_node == src // per_node)
    count = placement.logcnt[layers, topk.clip(min=0)]  # [N, L, k]
    in_turn = ((first + np.arange(len(topk)))[:, None, None] % count)[..., None]
    pick = np.where(
        same_gpu.any(-1, keepdims=True),
        same_gpu.argmax(-1)[..., None],
        np.where(same_node.any(-1, keepdims=True), same_node.argmax(-1)[..., None], in_turn),
    )
    return np.take_along_axis(gpu, pick, -1)[..., 0]


def traffic(
    topk: np.ndarray, placement: Placement, tokens_per_gpu: int = 1, chunk: int = 4096
) -> dict[str, np.ndarray]:
    """Per layer, the share of token-to-expert dispatches crossing a GPU and a node boundary, before and after."""
    if tokens_per_gpu < 1:
        raise UserError("`tokens_per_gpu` must be at least 1.")
    g, per_node = placement.num_gpus, placement.gpus_per_node
    contiguous = contiguous_gpu(placement.logcnt.shape[1], g)
    cross = np.zeros((4, topk.shape[1]), dtype=np.int64)  # GPU before, after; node before, after
    for start in range(0, len(topk), chunk):  # chunks keep the [tokens, L, k, replicas] candidates small
        ids = topk[start : start + chunk]
        valid = ids >= 0
        source = ((start + np.arange(len(ids))) // tokens_per_gpu) % g
        src = source[:, None, None]
        before = contiguous[ids.clip(min=0)]
        after = _dispatch_gpu(ids, placement, source, start)
        for row, crossed in enumerate(
            (before != src, after != src, before // per_node != src // per_node, after // per_node != src // per_node)
        ):
            cross[row] += (crossed & valid).sum((0, 2))
    total = np.maximum((topk >= 0).sum((0, 2)), 1)
    names = ("cross_gpu_before", "cross_gpu_after", "cross_node_before", "cross_node_after")
    return {name: cross[row] / total for row, name in enumerate(names)}


@dataclass
class PlanReport:
    placement: Placement
    source: LoadSource
    layers: pd.DataFrame  # schemas.PLAN_LAYERS (traffic columns only with per-token records)
    run: dict[str, Any] = field(default_factory=dict)

    def physical_to_logical_map(self) -> list[list[int]]:
        """[num_layers, P] over every decoder layer as SGLang indexes them; dense layers get the trivial map."""
        slots, experts = self.placement.phy2log.shape[1], self.placement.logcnt.shape[1]
        trivial = (np.arange(slots) % experts).tolist()
        rows = {layer: row.tolist() for layer, row in zip(self.source.moe_layers, self.placement.phy2log, strict=True)}
        return [rows.get(layer, trivial) for layer in range(self.source.num_layers)]

    def placement_frame(self) -> pd.DataFrame:
        p = self.placement
        layers, slots = p.phy2log.shape
        slot = np.tile(np.arange(slots), layers)
        frame = pd.DataFrame(
            {
                "layer": np.repeat(self.source.moe_layers, slots),
                "physical_slot": slot,
                "gpu": slot // p.slots_per_gpu,
                "node": slot // p.slots_per_gpu // p.gpus_per_node,
                "logical_expert": p.phy2log.reshape(-1),
            }
        )
        return frame.astype(schemas.PLACEMENT.dtypes)

    def write(self, out_dir: str | Path) -> list[Path]:
        """placement.json (SGLang --init-expert-location), placement.pt (EPLB tensors), placement.csv and the plan
        files, swapped into ``out_dir`` as one set."""
        import torch

        p = self.placement
        tensors = {
            "phy2log": torch.from_numpy(p.phy2log),
            "log2phy": torch.from_numpy(p.log2phy),
            "logcnt": torch.from_numpy(p.logcnt),
            "moe_layers": torch.tensor(self.source.moe_layers, dtype=torch.int64),
        }

        def write_all(out: Path) -> list[Path]:
            return [
                write_json(
                    {"physical_to_logical_map": self.physical_to_logical_map()}, out / "placement.json", indent=None
                ),
                write_torch(tensors, out / "placement.pt"),
                write_csv(self.placement_frame(), out / "placement.csv"),
                write_csv(self.layers, out / "plan_layers.csv"),
                write_json(self.run, out / "plan.json"),
            ]

        return replace_folder(out_dir, write_all)


def run_plan(
    source: LoadSource,
    num_gpus: int,
    num_nodes: int = 1,
    redundant: int = 0,
    num_groups: int = 1,
    policy: Policy = "auto",
    tokens_per_gpu: int = 1,
) -> PlanReport:
    """Place, then measure per-GPU load (and traffic, with per-token ids) before and after."""
    weight = source.weight
    placement = plan_placement(weight, num_gpus, num_nodes, redundant, num_groups, policy)
    experts = weight.shape[1]
    before = np.stack([np.bincount(contiguous_gpu(experts, num_gpus), weights=w, minlength=num_gpus) for w in weight])
    after = gpu_load(weight, placement.phy2log, num_gpus)
    columns: dict[str, Any] = {
        "layer": source.moe_layers,
        "max_over_mean_before": [metrics.max_over_mean(row) for row in before],
        "max_over_mean_after": [metrics.max_over_mean(row) for row in after],
        "balancedness_before": [metrics.balancedness(row) for row in before],
        "balancedness_after": [
            metrics.balancedness(w, num_gpus, p) for w, p in zip(weight, placement.phy2log, strict=True)
        ],
        "speedup": before.max(1) / np.where(after.max(1) > 0, after.max(1), np.nan),
    }
    if source.topk is not None:
        columns.update(traffic(source.topk, placement, tokens_per_gpu))
    names = [c for c in schemas.PLAN_LAYERS.names if c in columns]
    layers = pd.DataFrame(columns)[names].astype({c: schemas.PLAN_LAYERS.dtypes[c] for c in names})
    run = {
        "source": source.description,
        "num_layers": source.num_layers,
        "moe_layers": source.moe_layers,
        "experts": experts,
        "physical_experts": int(placement.phy2log.shape[1]),
        "redundant_experts": redundant,
        "gpus": num_gpus,
        "nodes": num_nodes,
        "groups": num_groups,
        "policy": placement.policy,
        "tokens_per_gpu": tokens_per_gpu if source.topk is not None else None,
        # vLLM's figure: layer-summed mean per-GPU load over layer-summed max
        "balancedness_before": float(before.mean(1).sum() / before.max(1).sum()),
        "balancedness_after": float(after.mean(1).sum() / after.max(1).sum()),
        "speedup": float(before.max(1).sum() / after.max(1).sum()),
    }
    return PlanReport(placement, source, layers, run)
