"""Engine records -> the tables ``balance`` writes, with only the columns a record supports.

Counts are poured into the same ``RouterTotals`` the balance accumulator produces and go through the same table
builders; columns a record cannot support (router probabilities, weights, losses, first choices: engines record
ids only, and SGLang's top-k slots are not sorted by weight) are then dropped, never zero- or NaN-filled.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Any

import numpy as np

from moe_inspect.analysis.accumulate import RouterTotals
from moe_inspect.analysis.balance import BalanceReport
from moe_inspect.analysis.run_info import package_versions
from moe_inspect.analysis.tables import coactivation_frame, drop_column, experts_frame, layers_frame
from moe_inspect.io.engine_records import EngineRecord
from moe_inspect.io.schemas import DEFAULT_CAPACITY_FACTORS
from moe_inspect.model.routers import RouterSpec

_ALWAYS_LAYERS = [
    "layer",
    "router",
    "experts",
    "load_entropy",
    "effective_experts",
    "cv",
    "max_over_mean",
    "jain",
    "dead_experts",
    "stack",
]
_ALWAYS_EXPERTS = ["layer", "expert", "count", "share", "router", "stack"]


def _spec(index: int, layer: int, num_experts: int, top_k: int, source: str) -> RouterSpec:
    return RouterSpec(
        index=index,
        layer=layer,
        path=f"layer {layer}",
        kind="mlp",
        model_type="engine record",
        router_class=source,
        num_experts=num_experts,
        top_k=top_k,
        null_experts=0,
        null_label="",
        scoring="unknown",  # type: ignore[arg-type]
        parser=None,  # type: ignore[arg-type]
        logits_index=0,
        selection="top-k",
        shared_experts=0,
    )


def capacity_drops(batch_counts: np.ndarray, capacity_factor: float) -> np.ndarray:
    """Per layer, assignments over capacity summed over batches: ``sum_b sum_e max(0, n_be - C_b)`` [L].

    ``C_b = ceil(cf * A_b / E)`` with ``A_b`` the batch's assignments (T*k), in exact integers like
    ``metrics.expert_capacity``; the count does not depend on the drop policy.
    """
    cf = Fraction(str(capacity_factor))
    experts = batch_counts.shape[-1]
    assignments = batch_counts.sum(-1, keepdims=True)
    capacity = -(-(cf.numerator * assignments) // (cf.denominator * experts))
    return np.clip(batch_counts - capacity, 0, None).sum((0, 2))


def _pair_counts(topk: np.ndarray, sequence: np.ndarray, chunk: int = 8192) -> tuple[np.ndarray, int]:
    """Per layer, consecutive pairs within one sequence whose top-k sets intersect [L], and the pair count.

    In chunks of tokens, so the [pairs, L, k, k] comparison stays small for long records.
    """
    same = sequence[1:] == sequence[:-1]
    hits = np.zeros(topk.shape[1], dtype=np.int64)
    for start in range(0, len(same), chunk):
        keep = same[start : start + chunk]
        prev = topk[start : start + len(keep)][keep]  # [pairs, L, k]
        nxt = topk[start + 1 : start + 1 + len(keep)][keep]
        hits += ((prev[..., :, None] == nxt[..., None, :]) & (prev[..., :, None] >= 0)).any((-1, -2)).sum(0)
    return hits, int(same.sum())


def _coactivation(topk: np.ndarray, layer: int, num_experts: int) -> np.ndarray:
    ids = topk[:, layer]
    a, b = ids[:, :, None], ids[:, None, :]
    valid = (a >= 0) & (b >= 0) & (a != b)
    key = (a * num_experts + b)[valid]
    return np.bincount(key, minlength=num_experts * num_experts).reshape(num_experts, num_experts).astype(np.int64)


def supported_columns(record: EngineRecord, factors: tuple[float, ...]) -> tuple[set[str], set[str]]:
    """The layers.csv and experts.csv columns a record can fill: counts always, k-based with a known k,
    overlap repeats with per-token ids, drop rates with per-batch counts."""
    layers = set(_ALWAYS_LAYERS) | {drop_column(cf) for cf in factors}
    experts = set(_ALWAYS_EXPERTS)
    if record.top_k is not None:
        layers |= {"tokens", "top_k"}
        experts.add("token_share")
    if record.per_token:
        layers |= {"repeat_any", "repeat_any_random"}
    return layers, experts


def record_report(
    record: EngineRecord, capacity_factors: tuple[float, ...] = DEFAULT_CAPACITY_FACTORS
) -> BalanceReport:
    """layers/experts (and, per token, co-activation) tables for every routed layer; dense layers in run."""
    e, k = record.num_experts, record.top_k
    dense = set(record.dense_layers)
    factors = tuple(capacity_factors) if record.batch_counts is not None else ()
    drops = {cf: capacity_drops(record.batch_counts, cf) for cf in factors}  # type: ignore[arg-type]
    repeats, pairs = _pair_counts(record.topk, record.sequence) if record.per_token else (None, 0)
    totals = []
    for layer in range(record.num_layers):
        if layer in dense:
            continue
        count = record.counts[layer]
        # per token: tokens with a routed id at this layer; counts only: assignments / k (k = 1 when unknown)
        tokens = (
            int((record.topk[:, layer] >= 0).any(-1).sum()) if record.topk is not None else int(count.sum()) // (k or 1)
        )
        spec = _spec(len(totals), layer, e, k or 1, record.format)
        totals.append(
            RouterTotals(
                spec=spec,
                tokens=tokens,
                count=count,
                first_choice=np.zeros(e, dtype=np.int64),
                prob_sum=np.zeros(e),
                weight_sum=np.zeros(e),
                coactivation=_coactivation(record.topk, layer, e) if record.per_token else np.zeros((e, e), np.int64),
                entropy_sum=math.nan,
                top1_sum=math.nan,
                z_sum=math.nan,
                aux_count=None,
                aux_prob_sum=None,
                repeat_first=0,
                repeat_any=int(repeats[layer]) if repeats is not None else 0,
                pairs=pairs,
                dropped={cf: int(drops[cf][layer]) for cf in factors},
            )
        )
    layer_columns, expert_columns = supported_columns(record, factors)
    layers = layers_frame(totals, factors)
    experts = experts_frame(totals)
    layers = layers[[c for c in layers.columns if c in layer_columns]]
    experts = experts[[c for c in experts.columns if c in expert_columns]]
    return BalanceReport(
        layers=layers,
        experts=experts,
        coactivation=coactivation_frame(totals) if record.per_token else None,  # type: ignore[arg-type]
        run=_run_info(record, factors),
    )


def _run_info(record: EngineRecord, factors: tuple[float, ...]) -> dict[str, Any]:
    batches = None if record.batch_counts is None else int(record.batch_counts.shape[0])
    return {
        "source": "engine record",
        "format": record.format,
        "records": record.files,
        "num_layers": record.num_layers,
        "experts": record.num_experts,
        "top_k": record.top_k,
        "physical_experts": None if record.physical_to_logical is None else int(record.physical_to_logical.shape[1]),
        "dense_layers": record.dense_layers,
        "moe_layers": [i for i in range(record.num_layers) if i not in set(record.dense_layers)],
        "tokens": None if record.topk is None else int(record.topk.shape[0]),
        "assignments": int(record.counts.sum()),
        "batches": batches,
        "batch_unit": record.batch_unit,
        "capacity_factors": list(factors),
        "per_token": record.per_token,
        "notes": record.notes,
        "packages": package_versions(),
    }
