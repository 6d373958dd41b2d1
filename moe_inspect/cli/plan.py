"""`moe-inspect plan`: an EPLB expert placement over GPUs and nodes, in SGLang's and DeepSeek's forms."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from moe_inspect.analysis.plan import load_source, run_plan
from moe_inspect.cli.common import err, out, user_errors
from moe_inspect.cli.ingest import RecordFormat
from moe_inspect.errors import UserError
from moe_inspect.render.plan import render_plan

PLAN_EXAMPLES = """Examples:

  moe-inspect plan runs/olmoe --gpus 8

  moe-inspect plan runs/sglang --gpus 64 --nodes 8 --redundant-experts 64 --groups 8 --out placement/

  moe-inspect plan /tmp/expert_distribution_recorder_*_*.pt --gpus 16 --nodes 2 --tokens-per-gpu 512

  moe-inspect plan routed.npz --experts 128 --gpus 8 --redundant-experts 8 --policy global
"""


class PolicyChoice(str, Enum):
    auto = "auto"
    hierarchical = "hierarchical"
    global_ = "global"


@user_errors
def plan(
    source: Annotated[list[Path], typer.Argument(help="A balance/ingest --out folder, or record files ingest reads.")],
    gpus: Annotated[int, typer.Option("--gpus", min=1, help="Expert-parallel GPUs (they divide experts + redundant).")],
    nodes: Annotated[int, typer.Option("--nodes", min=1, help="Nodes the GPUs are spread over.")] = 1,
    redundant_experts: Annotated[
        int, typer.Option("--redundant-experts", min=0, help="Extra physical slots for replicas of hot experts.")
    ] = 0,
    groups: Annotated[
        int, typer.Option("--groups", min=1, help="Expert groups of group-limited routing (DeepSeek-V3: 8).")
    ] = 1,
    policy: Annotated[
        PolicyChoice, typer.Option("--policy", help="hierarchical when the groups divide the nodes (auto), or force.")
    ] = PolicyChoice.auto,
    tokens_per_gpu: Annotated[
        int, typer.Option("--tokens-per-gpu", min=1, help="Consecutive tokens starting on each GPU (traffic).")
    ] = 1,
    out_dir: Annotated[
        Path | None,
        typer.Option("--out", help="Write placement.json, placement.pt, placement.csv, plan_layers.csv, plan.json."),
    ] = None,
    num_layers: Annotated[
        int | None, typer.Option("--num-layers", min=1, help="Decoder layers, when the source cannot tell.")
    ] = None,
    format: Annotated[RecordFormat, typer.Option("--format", help="Record format, as for ingest.")] = RecordFormat.auto,  # type: ignore[attr-defined]
    layers: Annotated[int | None, typer.Option("--layers", min=1, help="As for ingest.")] = None,
    top_k: Annotated[int | None, typer.Option("--top-k", min=1, help="As for ingest.")] = None,
    experts: Annotated[int | None, typer.Option("--experts", min=1, help="As for ingest.")] = None,
) -> None:
    """Place experts (and replicas of hot ones) on GPUs with DeepSeek's EPLB; report load and traffic."""
    if out_dir is not None and out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir} exists and is not a directory.")
    loaded = load_source(source, num_layers, format.value, layers, top_k, experts)
    report = run_plan(loaded, gpus, nodes, redundant_experts, groups, policy.value, tokens_per_gpu)  # type: ignore[arg-type]
    render_plan(report, out)
    if out_dir is not None:
        written = report.write(out_dir)
        err.print(f"Wrote {', '.join(p.name for p in written)} to {out_dir}")
