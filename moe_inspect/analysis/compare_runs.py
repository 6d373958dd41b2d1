"""Two ``balance --out`` folders compared without loading any model: how the load moves between two corpora.

Per layer the total-variation and Jensen-Shannon distances between the two assignment-share vectors; per expert
both shares, their log2 ratio and OLMoE's domain specialisation (token share against the uniform k/E in each run),
naming the run each expert specialises in.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from moe_inspect import metrics
from moe_inspect.analysis.compare_report import share_columns, write_compare_folder
from moe_inspect.errors import UserError
from moe_inspect.io import schemas

_NEEDED = ("run.json", "layers.csv", "experts.csv")


@dataclass
class RunsComparison:
    """``layers`` and ``experts`` (schemas ``COMPARE_RUN_*``) plus what was compared (``run``)."""

    layers: pd.DataFrame
    experts: pd.DataFrame
    run: dict[str, Any] = field(default_factory=dict)

    def write(self, out_dir: str | Path) -> list[Path]:
        """compare_layers.csv, compare_experts.csv and run.json, swapped into ``out_dir`` as one set."""
        return write_compare_folder(out_dir, self.layers, self.experts, self.run)


def is_balance_run(path: str | Path) -> bool:
    """Whether ``path`` is a folder that ``balance --out`` wrote."""
    folder = Path(path)
    return folder.is_dir() and all((folder / name).is_file() for name in _NEEDED)


def _read_run(path: str | Path) -> tuple[dict[str, Any], pd.DataFrame]:
    folder = Path(path)
    if not folder.is_dir():
        raise UserError(f"'{path}' is not a folder.")
    missing = [name for name in _NEEDED if not (folder / name).is_file()]
    if missing:
        raise UserError(f"'{path}' is not a balance output folder: it has no {' or '.join(missing)}.")
    try:
        run = json.loads((folder / "run.json").read_text(encoding="utf-8"))
        experts = pd.read_csv(folder / "experts.csv")
    except (OSError, ValueError) as exc:
        raise UserError(f"'{path}' holds an unreadable balance output ({type(exc).__name__}).") from None
    if "model" not in run or "routers" not in run or not {"layer", "expert", "count", "share"} <= set(experts):
        raise UserError(f"'{path}' is not a balance output folder: its run.json or experts.csv lacks the fields.")
    if "source" in experts:
        experts = experts[experts["source"] == "all"].drop(columns="source")
    if "router" not in experts:
        experts["router"] = "mlp"
    if "stack" not in experts:  # folders written before encoder-decoders had a stack column
        experts["stack"] = "decoder"
    return run, experts


def _shape(run: dict[str, Any]) -> list[tuple[Any, ...]]:
    return [
        (r.get("stack", "decoder"), r.get("layer"), r.get("kind"), r.get("experts"), r.get("top_k"))
        for r in run["routers"]
    ]


def compare_runs(dir_a: str | Path, dir_b: str | Path) -> RunsComparison:
    """Compare two ``balance --out`` folders of the same model (checked via their run.json)."""
    run_a, experts_a = _read_run(dir_a)
    run_b, experts_b = _read_run(dir_b)
    same_model = (run_a.get("model"), run_a.get("revision")) == (run_b.get("model"), run_b.get("revision"))
    if not same_model or _shape(run_a) != _shape(run_b):
        raise UserError(
            f"'{dir_a}' measured {run_a.get('model')} and '{dir_b}' measured {run_b.get('model')}"
            f"{'' if not same_model else ' with different MoE layers'}; compare runs of one model."
        )
    label_a, label_b = Path(dir_a).name or "a", Path(dir_b).name or "b"
    if label_a == label_b:
        label_a, label_b = "a", "b"
    layer_rows = []
    parts = []
    top_k = {(r.get("stack", "decoder"), r["layer"], r.get("kind", "mlp")): r["top_k"] for r in run_a["routers"]}
    keys = ["stack", "layer", "router"]
    for (stack, layer, router), group_a in experts_a.groupby(keys, sort=False):
        group_b = experts_b[
            (experts_b["stack"] == stack) & (experts_b["layer"] == layer) & (experts_b["router"] == router)
        ]
        a = group_a.sort_values("expert")
        b = group_b.sort_values("expert")
        e, k = len(a), top_k.get((stack, layer, router), 1)
        share_a, share_b = a["share"].to_numpy(), b["share"].to_numpy()
        count_a, count_b = a["count"].to_numpy(), b["count"].to_numpy()
        layer_rows.append(
            {
                "layer": layer,
                "load_tv": metrics.total_variation(count_a, count_b),
                "load_js": metrics.load_js(count_a, count_b),
                "stack": stack,
            }
        )
        spec_a = metrics.specialisation(a["token_share"].to_numpy(), e, k)
        spec_b = metrics.specialisation(b["token_share"].to_numpy(), e, k)
        parts.append(
            pd.DataFrame(
                {
                    "layer": layer,
                    "expert": a["expert"].to_numpy(),
                    **share_columns(count_a, count_b, share_a, share_b),
                    "specialisation_a": spec_a,
                    "specialisation_b": spec_b,
                    "specialises_in": np.where(
                        (spec_a > spec_b) & (spec_a > 1),
                        label_a,
                        np.where((spec_b > spec_a) & (spec_b > 1), label_b, "neither"),
                    ),
                    "stack": stack,
                }
            )
        )
    layers = pd.DataFrame(layer_rows, columns=schemas.COMPARE_RUN_LAYERS.names)
    experts = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=schemas.COMPARE_RUN_EXPERTS.names)
    run = {
        "compared": "runs",
        "run_a": str(dir_a),
        "run_b": str(dir_b),
        "labels": [label_a, label_b],
        "model": run_a.get("model"),
        "tokens_a": run_a.get("tokens"),
        "tokens_b": run_b.get("tokens"),
        "corpus_a": run_a.get("corpus"),
        "corpus_b": run_b.get("corpus"),
    }
    return RunsComparison(
        layers.astype(schemas.COMPARE_RUN_LAYERS.dtypes),
        experts[schemas.COMPARE_RUN_EXPERTS.names].astype(schemas.COMPARE_RUN_EXPERTS.dtypes),
        run,
    )
