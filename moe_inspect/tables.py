"""Build the long-format DataFrames of ``schemas`` from captured router outputs.

Device tensors are copied to the host once per router here, never inside hooks.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch

from moe_inspect import schemas
from moe_inspect.capture import RouterOutput
from moe_inspect.metrics import router_entropy
from moe_inspect.routers import RouterSpec


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
    )


def route_frame(
    routers: Sequence[RouterSpec],
    calls: Sequence[Sequence[RouterOutput]],
    token_ids: Sequence[int],
    tokens: Sequence[str],
    phases: Sequence[str] | None = None,
) -> pd.DataFrame:
    """One row per (token, router, rank), sorted by position, then router order, then rank.

    ``calls[i]`` are router i's outputs for a single sequence whose rows are ``token_ids`` in order.
    """
    n = len(token_ids)
    phases = list(phases) if phases is not None else ["prefill"] * n
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
        expert_type = np.where(expert_flat >= spec.num_experts, spec.null_label, "routed")
        parts.append(
            pd.DataFrame(
                {
                    "position": position,
                    "token_id": np.asarray(token_ids)[position],
                    "token": np.asarray(tokens, dtype=object)[position],
                    "layer": spec.layer,
                    "rank": np.tile(np.arange(k), n),
                    "expert": expert_flat,
                    "weight": weights.reshape(-1),
                    "probability": chosen_p.reshape(-1),
                    "router_entropy": entropy[position],
                    "router": spec.kind,
                    "phase": np.asarray(phases, dtype=object)[position],
                    "expert_type": expert_type,
                    "_order": spec.index,
                }
            )
        )
    if not parts:
        return _frame(schemas.ROUTE, {name: [] for name in schemas.ROUTE.names})
    frame = pd.concat(parts, ignore_index=True)
    frame = frame.sort_values(["position", "_order", "rank"], kind="stable").drop(columns="_order")
    return frame.reset_index(drop=True).astype(schemas.ROUTE.dtypes)
