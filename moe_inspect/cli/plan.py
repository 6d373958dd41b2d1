"""`moe-inspect plan`: an EPLB expert placement over GPUs and nodes, in SGLang's and DeepSeek's forms."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from moe_inspect.cli.common import Output, out, save, user_errors
from moe_inspect.cli.ingest import ExpertsOpt, FormatOpt, LayersOpt, RecordFormat, TopKOpt
from moe_inspect.cli.options import JsonOpt, QuietOpt
from moe_inspect.errors import UserError

PLAN_EXAMPLES = """Examples:

  moe-inspect plan runs/olmoe --gpus 8

  moe-inspect plan runs/sglang --gpus 64 --nodes 8 --redundant-experts 64 --groups 8 --out placement/

  moe-inspect plan /tmp/expert_distribution_recorder_*_*.pt --gpus 16 --nodes 2 --tokens-per-gpu 512

  moe-inspect plan routed.npz --experts 128 --gpus 8 --redundant-experts 8 --policy global --json
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
    format: FormatOpt = RecordFormat.auto,  # type: ignore[attr-defined]
    layers: LayersOpt = None,
    top_k: TopKOpt = None,
    experts: ExpertsOpt = None,
    quiet: QuietOpt = False,
    json_output: JsonOpt = False,
) -> None:
    """Place experts (and replicas of hot ones) on GPUs with DeepSeek's EPLB; report load and traffic."""
    from moe_inspect.analysis.plan import load_source, run_plan
    from moe_inspect.io.export import check_output
    from moe_inspect.render.plan import render_plan

    output = Output(quiet, json_output)
    if out_dir is not None:
        check_output(out_dir, "--out", folder=True)
    with output.spinner("Placing experts…"):
        loaded = load_source(source, num_layers, format.value, layers, top_k, experts)
        report = run_plan(loaded, gpus, nodes, redundant_experts, groups, policy.value, tokens_per_gpu)  # type: ignore[arg-type]
    if json_output:
        output.json(
            {
                "run": report.run,
                "layers": report.layers,
                "physical_to_logical_map": report.physical_to_logical_map(),
            }
        )
    elif output.tables:
        render_plan(report, out)
    if out_dir is not None:
        failure = save(report.write, out_dir, "--out", output)
        if failure:
            raise UserError(failure)
