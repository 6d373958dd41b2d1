"""The comparison's tables: per-layer and per-expert frames and the one-row summary, from the device sums."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from moe_inspect import metrics
from moe_inspect.analysis.compare_record import OUTPUT_TOP
from moe_inspect.io import schemas
from moe_inspect.io.export import replace_folder, write_csv, write_json

if TYPE_CHECKING:
    from moe_inspect.analysis.compare_batch import Comparer

#: KL's support, said wherever the figure is shown.
KL_SUPPORT = f"model A's top-{OUTPUT_TOP} tokens plus one bucket for the rest of the vocabulary"


# Per-router sums, in this order, in one float64 device vector.
SUMS = (
    "first",
    "overlap",
    "jaccard",
    "exact",
    "weight_overlap",
    "js",
    "margin_changed",
    "changed",
    "margin_kept",
)


def write_compare_folder(
    out_dir: str | Path, layers: pd.DataFrame, experts: pd.DataFrame, run: dict[str, Any]
) -> list[Path]:
    """compare_layers.csv, compare_experts.csv and run.json, swapped into ``out_dir`` as one set."""

    def write_all(out: Path) -> list[Path]:
        return [
            write_csv(layers, out / "compare_layers.csv"),
            write_csv(experts, out / "compare_experts.csv"),
            write_json(run, out / "run.json"),
        ]

    return replace_folder(out_dir, write_all)


def share_columns(count_a: np.ndarray, count_b: np.ndarray, share_a: np.ndarray, share_b: np.ndarray) -> dict[str, Any]:
    """The per-expert columns both comparisons share (``COMPARE_EXPERTS`` / ``COMPARE_RUN_EXPERTS``), in order."""
    return {
        "count_a": count_a,
        "count_b": count_b,
        "share_a": share_a,
        "share_b": share_b,
        "share_diff": share_b - share_a,
        "log2_ratio": metrics.log2_ratio(share_a, share_b),
    }


@dataclass
class CompareReport:
    """``layers``, ``experts`` and ``summary`` (schemas ``COMPARE_*``), plus what was run (``run``, run.json)."""

    layers: pd.DataFrame
    experts: pd.DataFrame
    summary: pd.DataFrame
    run: dict[str, Any] = field(default_factory=dict)

    def write(self, out_dir: str | Path) -> list[Path]:
        """compare_layers.csv, compare_experts.csv and run.json (with ``compare_summary``), swapped in as one set."""
        return write_compare_folder(out_dir, self.layers, self.experts, self.run)


def _frames(comparer: Comparer) -> tuple[pd.DataFrame, pd.DataFrame]:
    layer_rows = []
    expert_parts = []
    for spec in comparer.routers:
        state = comparer.state.get(spec.index)
        if state is None:
            continue
        s = dict(zip(SUMS, state.sums.cpu().tolist(), strict=True))
        tokens = max(state.tokens, 1)
        e, k = spec.num_experts, spec.top_k
        count_a, count_b = state.count_a.cpu().numpy()[:e], state.count_b.cpu().numpy()[:e]
        share_a = count_a / max(state.tokens * k, 1)
        share_b = count_b / max(state.tokens * k, 1)
        kept = state.tokens - s["changed"]
        layer_rows.append(
            {
                "layer": spec.layer,
                "tokens": state.tokens,
                "first_choice_agreement": s["first"] / tokens,
                "topk_overlap": s["overlap"] / tokens,
                "topk_jaccard": s["jaccard"] / tokens,
                "exact_set_agreement": s["exact"] / tokens,
                "weight_overlap": s["weight_overlap"] / tokens,
                "routing_js": s["js"] / tokens,
                "load_tv": metrics.total_variation(count_a, count_b) if count_a.sum() and count_b.sum() else np.nan,
                "load_js": metrics.load_js(count_a, count_b) if count_a.sum() and count_b.sum() else np.nan,
                "margin_changed": s["margin_changed"] / s["changed"] if s["changed"] else np.nan,
                "margin_kept": s["margin_kept"] / kept if kept else np.nan,
            }
        )
        expert_parts.append(
            pd.DataFrame(
                {
                    "layer": spec.layer,
                    "expert": np.arange(e),
                    **share_columns(count_a, count_b, share_a, share_b),
                }
            )
        )
    layers = pd.DataFrame(layer_rows, columns=schemas.COMPARE_LAYERS.names).astype(schemas.COMPARE_LAYERS.dtypes)
    experts = (
        pd.concat(expert_parts, ignore_index=True)
        if expert_parts
        else pd.DataFrame(columns=schemas.COMPARE_EXPERTS.names)
    )
    return layers, experts[schemas.COMPARE_EXPERTS.names].astype(schemas.COMPARE_EXPERTS.dtypes)


def _summary(comparer: Comparer, layers: pd.DataFrame, mode: str, record_bytes: int | None) -> dict[str, Any]:
    out = comparer.out_sums.cpu().tolist() if comparer.out_sums is not None else [0.0, 0.0]
    positions = comparer.positions
    tokens = int(layers["tokens"].max()) if len(layers) else 0
    worst = layers.loc[layers["first_choice_agreement"].idxmin()] if len(layers) else None
    return {
        "tokens": tokens,
        "predicted_positions": positions,
        "top1_agreement": out[0] / positions if positions else float("nan"),
        "output_kl": out[1] / positions if positions else float("nan"),
        "kl_support": KL_SUPPORT,
        "first_choice_agreement": float(layers["first_choice_agreement"].mean()) if len(layers) else float("nan"),
        "routing_js": float(layers["routing_js"].mean()) if len(layers) else float("nan"),
        "worst_layer": int(worst["layer"]) if worst is not None else -1,
        "worst_first_choice_agreement": float(worst["first_choice_agreement"]) if worst is not None else float("nan"),
        "mode": mode,
        "record_bytes": record_bytes,
        "record_bytes_per_token": record_bytes / tokens if record_bytes is not None and tokens else None,
    }


def build_report(comparer: Comparer, mode: str, record_bytes: int | None, run: dict[str, Any]) -> CompareReport:
    layers, experts = _frames(comparer)
    summary = _summary(comparer, layers, mode, record_bytes)
    frame = pd.DataFrame([summary], columns=schemas.COMPARE_SUMMARY.names).astype(schemas.COMPARE_SUMMARY.dtypes)
    return CompareReport(layers, experts, frame, {**run, "compare_summary": summary})
