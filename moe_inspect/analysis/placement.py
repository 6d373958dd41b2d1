"""DeepSeek's expert-parallel load balancer (EPLB), vectorised over layers, and what a placement does to load.

``rebalance_experts`` follows the published algorithm (github.com/deepseek-ai/EPLB, MIT): replicate the expert
with the highest load per replica until every physical slot is used, and pack items in decreasing weight onto the
lightest pack that still has room; hierarchically (expert groups onto nodes, replicas within a node, physical
experts onto the node's GPUs) when the groups divide the nodes, globally otherwise. The published loops run per
layer; here every step runs on all layers (and nodes) at once, so DeepSeek-V3's shape takes milliseconds.
It has EPLB's known weakness: two replicas of one expert may share a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from moe_inspect.errors import UserError

Policy = Literal["auto", "hierarchical", "global"]


def balanced_packing(weight: np.ndarray, num_packs: int) -> tuple[np.ndarray, np.ndarray]:
    """Pack ``weight [rows, items]`` into ``num_packs`` packs of ``items / num_packs`` each, per row.

    Items go in decreasing weight (stable on ties) to the lightest pack with room (lowest index on ties).
    Returns ``pack_index`` and ``rank_in_pack``, both ``[rows, items]``.
    """
    rows, items = weight.shape
    if items % num_packs:
        raise ValueError(f"{items} items do not split into {num_packs} equal packs")
    per_pack = items // num_packs
    if per_pack == 1:  # one item per pack: identity, as the published code does
        index = np.broadcast_to(np.arange(items), (rows, items)).copy()
        return index, np.zeros((rows, items), dtype=np.int64)
    order = np.argsort(-weight, axis=1, kind="stable")
    pack_weight = np.zeros((rows, num_packs))
    pack_items = np.zeros((rows, num_packs), dtype=np.int64)
    pack_index = np.empty((rows, items), dtype=np.int64)
    rank_in_pack = np.empty((rows, items), dtype=np.int64)
    r = np.arange(rows)
    for step in range(items):
        item = order[:, step]
        pack = np.where(pack_items < per_pack, pack_weight, np.inf).argmin(1)
        pack_index[r, item] = pack
        rank_in_pack[r, item] = pack_items[r, pack]
        pack_weight[r, pack] += weight[r, item]
        pack_items[r, pack] += 1
    return pack_index, rank_in_pack


def replicate_experts(weight: np.ndarray, num_physical: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Give ``num_physical - E`` extra replicas, one at a time, to the expert with the most load per replica.

    Returns ``phy2log [rows, P]`` (slot i < E holds expert i), ``rank [rows, P]`` (replica number of each slot)
    and ``logcnt [rows, E]``.
    """
    rows, num_logical = weight.shape
    if num_physical < num_logical:
        raise ValueError(f"{num_physical} physical slots cannot hold {num_logical} experts")
    phy2log = np.broadcast_to(np.arange(num_physical), (rows, num_physical)).copy()
    rank = np.zeros((rows, num_physical), dtype=np.int64)
    logcnt = np.ones((rows, num_logical), dtype=np.int64)
    r = np.arange(rows)
    for slot in range(num_logical, num_physical):
        hot = (weight / logcnt).argmax(1)
        phy2log[:, slot] = hot
        rank[:, slot] = logcnt[r, hot]
        logcnt[r, hot] += 1
    return phy2log, rank, logcnt


def _inverse(perm: np.ndarray) -> np.ndarray:
    inv = np.empty_like(perm)
    np.put_along_axis(inv, perm, np.broadcast_to(np.arange(perm.shape[1]), perm.shape), axis=1)
    return inv


def _hierarchical(
    weight: np.ndarray, num_physical: int, num_groups: int, num_nodes: int, num_gpus: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    layers, num_logical = weight.shape
    group_size = num_logical // num_groups
    groups_per_node = num_groups // num_nodes
    per_gpu = num_physical // num_gpus
    # 1. expert groups onto nodes; mlog = logical experts renumbered node by node
    group_load = weight.reshape(layers, num_groups, group_size).sum(-1)
    group_pack, group_rank = balanced_packing(group_load, num_nodes)
    log2mlog = (((group_pack * groups_per_node + group_rank) * group_size)[..., None] + np.arange(group_size)).reshape(
        layers, num_logical
    )
    mlog2log = _inverse(log2mlog)
    # 2. replicas within each node: rows are (layer, node)
    mlog_load = np.take_along_axis(weight, mlog2log, 1).reshape(layers * num_nodes, num_logical // num_nodes)
    phy2mlog, phyrank, mlogcnt = replicate_experts(mlog_load, num_physical // num_nodes)
    # 3. physical experts onto the node's GPUs
    phy_load = np.take_along_axis(mlog_load / mlogcnt, phy2mlog, 1)
    pack, rank_in_pack = balanced_packing(phy_load, num_gpus // num_nodes)
    pphy2phy = _inverse(pack * per_gpu + rank_in_pack)
    pphy2mlog = np.take_along_axis(phy2mlog, pphy2phy, 1)
    offsets = np.arange(0, num_logical, num_logical // num_nodes).reshape(1, -1, 1)
    pphy2mlog = (pphy2mlog.reshape(layers, num_nodes, -1) + offsets).reshape(layers, -1)
    pphy2log = np.take_along_axis(mlog2log, pphy2mlog, 1)
    pphyrank = np.take_along_axis(phyrank, pphy2phy, 1).reshape(layers, -1)
    logcnt = np.take_along_axis(mlogcnt.reshape(layers, -1), log2mlog, 1)
    return pphy2log, pphyrank, logcnt


def choose_policy(policy: Policy, num_groups: int, num_nodes: int) -> str:
    """'hierarchical' when the expert groups divide the nodes (or when asked and possible), else 'global'."""
    fits = num_groups % num_nodes == 0
    if policy == "hierarchical" and not fits:
        raise UserError(
            f"The hierarchical policy needs the {num_groups} expert groups to divide over {num_nodes} nodes."
        )
    if policy not in ("auto", "hierarchical", "global"):
        raise UserError(f"Unknown placement policy {policy!r}; expected auto, hierarchical or global.")
    # one group on one node: DeepSeek's hierarchical call is then exactly the global one, so say global
    single = num_groups == 1 and num_nodes == 1
    return "global" if policy == "global" or not fits or single else "hierarchical"


def rebalance_experts(
    weight: np.ndarray,
    num_replicas: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
    policy: Policy = "auto",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """EPLB: ``phy2log [L, num_replicas]``, ``log2phy [L, E, max_replicas]`` (-1 padded), ``logcnt [L, E]``.

    ``weight [L, E]`` is each MoE layer's logical expert load; the signature and outputs are DeepSeek's.
    """
    weight = np.asarray(weight, dtype=np.float64)
    layers, num_logical = weight.shape
    check_shape(num_logical, num_replicas, num_groups, num_nodes, num_gpus)
    if choose_policy(policy, num_groups, num_nodes) == "hierarchical":
        phy2log, rank, logcnt = _hierarchical(weight, num_replicas, num_groups, num_nodes, num_gpus)
    else:
        phy2log, rank, logcnt = _hierarchical(weight, num_replicas, 1, 1, num_gpus)
    width = int(logcnt.max())
    log2phy = np.full((layers, num_logical * width), -1, dtype=np.int64)
    np.put_along_axis(log2phy, phy2log * width + rank, np.broadcast_to(np.arange(num_replicas), phy2log.shape), 1)
    return phy2log, log2phy.reshape(layers, num_logical, width), logcnt


def check_shape(num_logical: int, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int) -> None:
    """Refuse, in one sentence, shapes EPLB cannot place."""
    if num_replicas < num_logical:
        raise UserError(f"{num_replicas} physical slots cannot hold {num_logical} experts.")
    if num_gpus < 1 or num_nodes < 1 or num_gpus % num_nodes:
        raise UserError(f"{num_gpus} GPUs do not split evenly over {num_nodes} nodes.")
    if num_replicas % num_gpus:
        raise UserError(
            f"{num_replicas} physical expert slots (experts + redundant) do not split over {num_gpus} GPUs."
        )
    if num_groups < 1 or num_logical % num_groups:
        raise UserError(f"{num_logical} experts do not split into {num_groups} expert groups.")
    if num_groups % num_nodes == 0 and (num_replicas // num_nodes) % (num_gpus // num_nodes):
        raise UserError(f"{num_replicas // num_nodes} slots per node do not split over {num_gpus // num_nodes} GPUs.")


@dataclass
class Placement:
    """Per MoE layer: the physical slots' experts and how many replicas each expert has."""

    phy2log: np.ndarray  # [L, P]
    log2phy: np.ndarray  # [L, E, R_max], -1 padded
    logcnt: np.ndarray  # [L, E]
    num_gpus: int
    num_nodes: int
    policy: str

    @property
    def slots_per_gpu(self) -> int:
        return self.phy2log.shape[1] // self.num_gpus

    @property
    def gpus_per_node(self) -> int:
        return self.num_gpus // self.num_nodes


def plan_placement(
    weight: np.ndarray,
    num_gpus: int,
    num_nodes: int = 1,
    redundant: int = 0,
    num_groups: int = 1,
    policy: Policy = "auto",
) -> Placement:
    """EPLB over ``weight [L, E]`` with ``E + redundant`` slots on ``num_gpus`` GPUs in ``num_nodes`` nodes."""
    if redundant < 0:
        raise UserError("The number of redundant experts cannot be negative.")
    num_logical = weight.shape[1]
    chosen = choose_policy(policy, num_groups, num_nodes)
    phy2log, log2phy, logcnt = rebalance_experts(
        weight, num_logical + redundant, num_groups, num_nodes, num_gpus, policy
    )
    return Placement(phy2log, log2phy, logcnt, num_gpus, num_nodes, chosen)
