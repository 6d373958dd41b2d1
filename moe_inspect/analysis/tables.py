"""Build the long-format DataFrames of ``schemas`` from captured router outputs.

Device tensors are copied to the host once per router here, never inside hooks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch

from moe_inspect import metrics
from moe_inspect.analysis.accumulate import RouterTotals
from moe_inspect.io import schemas
from moe_inspect.io.tokens import hex_label
from moe_inspect.metrics import router_entropy
from moe_inspect.model.capture import RouterOutput
from moe_inspect.model.routers import RouterSpec


def _frame(schema: schemas.Schema, columns: dict[str, np.ndarray | list]) -> pd.DataFrame:
    frame = pd.DataFrame({name: columns[name] for name in schema.names})
    return frame.astype(schema.dtypes)


def routers_frame(routers: Sequence[RouterSpec]) -> pd.DataFrame:
    """The router map as a table."""
    rows = [spec.describe() for spec in routers]
    columns = {name: [row[name] for row in rows] for name in schemas.ROUTERS.names}
    return _frame(schemas.ROUTERS, columns)


def concat_calls(calls: Sequence[RouterOutput]) -> RouterOutput:
    """Join successive calls of one router (prefill, then one per decode step) along the token axis."""
    if len(calls) == 1:
        return calls[0]
    token_dim = 1 if calls[0].logits.dim() == 3 else 0
    return RouterOutput(
        logits=torch.cat([c.logits for c in calls], dim=token_dim),
        experts=torch.cat([c.experts for c in calls]),
        weights=torch.cat([c.weights for c in calls]),
        hash_selected=calls[0].hash_selected,
        dropped=None if calls[0].dropped is None else torch.cat([c.dropped for c in calls]),
    )


def route_frame(
    routers: Sequence[RouterSpec],
    calls: Sequence[Sequence[RouterOutput]],
    token_ids: Sequence[int],
    tokens: Sequence[str],
    phases: Sequence[str] | None = None,
    token_bytes: Sequence[bytes] | None = None,
    modality: Sequence[str] | None = None,
) -> pd.DataFrame:
    """One row per (token, router, rank), sorted by position, then router order, then rank.

    ``calls[i]`` are router i's outputs for a single sequence whose rows are ``token_ids`` in order; ``modality``
    says per position what the model embedded there (default all ``text``).
    """
    n = len(token_ids)
    phases = list(phases) if phases is not None else ["prefill"] * n
    raw = token_bytes if token_bytes is not None else [t.encode("utf-8") for t in tokens]
    hexes = np.asarray([hex_label(b) for b in raw], dtype=object)
    modalities = np.asarray(list(modality) if modality is not None else ["text"] * n, dtype=object)
    parts: list[pd.DataFrame] = []
    for spec, router_calls in zip(routers, calls, strict=True):
        if not router_calls:
            continue
        out = concat_calls(router_calls)
        probs = out.probabilities(spec)
        entropy = router_entropy(probs).cpu().numpy()
        experts = out.experts.cpu().numpy()
        weights = out.weights.cpu().numpy()
        chosen_p = probs.gather(1, out.experts.clamp(max=probs.shape[-1] - 1)).cpu().numpy()
        if experts.shape[0] != n:
            raise ValueError(f"router {spec.path} saw {experts.shape[0]} tokens, expected {n}")
        k = experts.shape[1]
        position = np.repeat(np.arange(n), k)
        expert_flat = experts.reshape(-1)
        expert_type = np.where(expert_flat >= spec.num_experts, spec.null_label, "routed").astype(object)
        weight_flat = weights.reshape(-1)
        if out.dropped is not None:  # over capacity: the router chose the expert, the experts never saw the token
            dropped = out.dropped.cpu().numpy().reshape(-1)
            expert_type[dropped] = "dropped"
            expert_flat = np.where(dropped, -1, expert_flat)
            weight_flat = np.where(dropped, 0.0, weight_flat)
        parts.append(
            pd.DataFrame(
                {
                    "position": position,
                    "token_id": np.asarray(token_ids)[position],
                    "token": np.asarray(tokens, dtype=object)[position],
                    "token_bytes": hexes[position],
                    "layer": spec.layer,
                    "rank": np.tile(np.arange(k), n),
                    "expert": expert_flat,
                    "weight": weight_flat,
                    "probability": chosen_p.reshape(-1),
                    "router_entropy": entropy[position],
                    "router": spec.kind,
                    "phase": np.asarray(phases, dtype=object)[position],
                    "expert_type": expert_type,
                    "stack": spec.stack,
                    "modality": modalities[position],
                    "_order": spec.index,
                }
            )
        )
    if not parts:
        return _frame(schemas.ROUTE, {name: [] for name in schemas.ROUTE.names})
    frame = pd.concat(parts, ignore_index=True)
    frame = frame.sort_values(["position", "_order", "rank"], kind="stable")[schemas.ROUTE.names]
    return frame.reset_index(drop=True).astype(schemas.ROUTE.dtypes)


def _nan_if(condition: bool, value: float) -> float:
    return math.nan if condition else value


def layers_frame(totals: Sequence[RouterTotals], capacity_factors: Sequence[float]) -> pd.DataFrame:
    """One row per router: the per-layer figures of ``schemas.LAYERS`` plus ``drop_rate_cf<X>`` columns."""
    rows = []
    for t in totals:
        spec, e, k = t.spec, t.spec.num_experts, t.spec.top_k
        routed = t.count[:e]
        assignments = max(int(t.count.sum()), 1)
        share = metrics.assignment_share(routed) if routed.sum() > 0 else np.zeros(e)
        first_random, any_random = metrics.random_repeat_baselines(e, min(k, e))
        no_tokens = t.tokens == 0
        aux = (
            metrics.aux_loss_from_sums(t.aux_count, t.aux_prob_sum, t.tokens, len(t.aux_count))
            if t.aux_count is not None
            else math.nan
        )
        row = {
            "layer": spec.layer,
            "router": spec.kind,
            "tokens": t.tokens,
            "experts": e,
            "top_k": k,
            "load_entropy": _nan_if(no_tokens, metrics.load_entropy(share)),
            "effective_experts": _nan_if(no_tokens, metrics.effective_experts(share)),
            "router_entropy": _nan_if(no_tokens, t.entropy_sum / max(t.tokens, 1)),
            "top1_prob": _nan_if(no_tokens, t.top1_sum / max(t.tokens, 1)),
            "cv": _nan_if(no_tokens, metrics.coefficient_of_variation(routed)),
            "max_over_mean": _nan_if(no_tokens, metrics.max_over_mean(routed)),
            "jain": _nan_if(no_tokens, metrics.jain_index(routed)),
            "dead_experts": metrics.dead_experts(routed),
            "aux_loss": aux,
            "switch_loss": _nan_if(no_tokens, metrics.switch_loss(t.first_choice[:e], t.prob_sum[:e], t.tokens)),
            "z_loss": _nan_if(no_tokens, t.z_sum / max(t.tokens, 1)),
            "repeat_first": t.repeat_first / t.pairs if t.pairs else math.nan,
            "repeat_first_random": first_random,
            "repeat_any": t.repeat_any / t.pairs if t.pairs else math.nan,
            "repeat_any_random": any_random,
            "null_share": float(t.count[e:].sum()) / assignments,
            "stack": spec.stack,
            "drop_rate": (
                math.nan if t.capacity_dropped is None or no_tokens else float(t.capacity_dropped.sum()) / assignments
            ),
        }
        for cf in capacity_factors:
            row[drop_column(cf)] = t.dropped[cf] / assignments if not no_tokens else math.nan
        rows.append(row)
    names = schemas.LAYERS.names + [drop_column(cf) for cf in capacity_factors]
    frame = pd.DataFrame(rows, columns=names)
    return frame.astype({**schemas.LAYERS.dtypes, **{drop_column(cf): "float64" for cf in capacity_factors}})


def drop_column(capacity_factor: float) -> str:
    """'drop_rate_cf1.25' for 1.25, 'drop_rate_cf2' for 2.0."""
    return f"drop_rate_cf{capacity_factor:g}"


def experts_frame(totals: Sequence[RouterTotals]) -> pd.DataFrame:
    """One row per (router, routed expert)."""
    parts = []
    for t in totals:
        e, tokens = t.spec.num_experts, max(t.tokens, 1)
        count = t.count[:e]
        parts.append(
            pd.DataFrame(
                {
                    "layer": t.spec.layer,
                    "expert": np.arange(e),
                    "count": count,
                    "share": count / max(tokens * t.spec.top_k, 1),
                    "token_share": count / tokens,
                    "first_choice": t.first_choice[:e],
                    "mean_prob": t.prob_sum[:e] / tokens,
                    "mean_weight": np.divide(
                        t.weight_sum[:e], count, out=np.full(e, np.nan), where=count > 0
                    ),
                    "router": t.spec.kind,
                    "stack": t.spec.stack,
                    "drop_rate": (
                        np.full(e, np.nan) if t.capacity_dropped is None
                        else np.divide(t.capacity_dropped[:e], count, out=np.full(e, np.nan), where=count > 0)
                    ),
                }
            )
        )
    if not parts:
        return _frame(schemas.EXPERTS, {name: [] for name in schemas.EXPERTS.names})
    return pd.concat(parts, ignore_index=True)[schemas.EXPERTS.names].astype(schemas.EXPERTS.dtypes)


def coactivation_frame(totals: Sequence[RouterTotals]) -> pd.DataFrame:
    """Expert pairs chosen together at least once, both orders, with N[a,b]/N[a]."""
    parts = []
    for t in totals:
        e = t.spec.num_experts
        a, b = np.nonzero(t.coactivation)
        counts = t.coactivation[a, b]
        parts.append(
            pd.DataFrame(
                {
                    "layer": t.spec.layer,
                    "expert_a": a,
                    "expert_b": b,
                    "count": counts,
                    "share_of_a": counts / np.maximum(t.count[:e][a], 1),
                    "router": t.spec.kind,
                    "stack": t.spec.stack,
                }
            )
        )
    if not parts:
        return _frame(schemas.COACTIVATION, {name: [] for name in schemas.COACTIVATION.names})
    frame = pd.concat(parts, ignore_index=True)
    return frame[schemas.COACTIVATION.names].astype(schemas.COACTIVATION.dtypes)
