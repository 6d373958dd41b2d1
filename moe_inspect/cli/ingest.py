"""`moe-inspect ingest`: SGLang / vLLM routing records into balance's tables and terminal report."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from moe_inspect.cli.common import Output, out, user_errors
from moe_inspect.cli.options import JsonOpt, QuietOpt
from moe_inspect.errors import UserError
from moe_inspect.io.schemas import DEFAULT_CAPACITY_FACTORS

INGEST_EXAMPLES = """Examples:

  moe-inspect ingest /tmp/expert_distribution_recorder_1732500000.pt --out runs/sglang

  moe-inspect ingest /tmp/expert_distribution_recorder_*_*.pt --out runs/per-token

  moe-inspect ingest routed.jsonl --layers 61 --top-k 8 --experts 256 --out runs/replay

  moe-inspect ingest routed_experts.npz --experts 128 --json
"""

# io.engine_records.FORMATS, spelled out so that --help imports no numpy (a test keeps the two equal)
RECORD_FORMATS = (
    "sglang-stat", "sglang-per-pass", "sglang-csv", "sglang-per-token", "routed-experts", "sglang-routed",
    "vllm-routed",
)  # fmt: skip
RecordFormat = Enum("RecordFormat", {name: name for name in ("auto", *RECORD_FORMATS)}, type=str)  # type: ignore[misc]

FormatOpt = Annotated[RecordFormat, typer.Option("--format", help="Record format; auto detects it from the content.")]
LayersOpt = Annotated[
    int | None, typer.Option("--layers", min=1, help="num_hidden_layers, for raw int32 routed experts.")
]
TopKOpt = Annotated[
    int | None, typer.Option("--top-k", min=1, help="Experts per token; needed for raw int32, checked otherwise.")
]
ExpertsOpt = Annotated[
    int | None, typer.Option("--experts", min=1, help="Routed experts per layer, where only ids are recorded.")
]


@user_errors
def ingest(
    records: Annotated[list[Path], typer.Argument(help="Record files of one format (several ranks or requests).")],
    out_dir: Annotated[
        Path | None,
        typer.Option("--out", help="Write layers.csv, experts.csv, coactivation.csv (per-token) and run.json here."),
    ] = None,
    format: FormatOpt = RecordFormat.auto,  # type: ignore[attr-defined]
    layers: LayersOpt = None,
    top_k: TopKOpt = None,
    experts: ExpertsOpt = None,
    capacity_factor: Annotated[
        list[float] | None,
        typer.Option(
            "--capacity-factor",
            help="Capacity factor for the drop-rate what-ifs; repeat it for several.",
            show_default=", ".join(f"{f:g}" for f in DEFAULT_CAPACITY_FACTORS),
        ),
    ] = None,
    plot: Annotated[
        Path | None, typer.Option("--plot", help="Write the load heatmap as .png, .pdf or .svg (matplotlib).")
    ] = None,
    quiet: QuietOpt = False,
    json_output: JsonOpt = False,
) -> None:
    """Read SGLang expert-distribution dumps or vLLM/SGLang routed experts and report load like balance."""
    from moe_inspect.analysis.balance import check_capacity_factors
    from moe_inspect.analysis.ingest import record_report
    from moe_inspect.cli.heatmap import check_plot, need_matplotlib, save_report_and_heatmap
    from moe_inspect.io.engine_records import read_records
    from moe_inspect.io.export import check_output
    from moe_inspect.render.balance import render_balance

    output = Output(quiet, json_output)
    if plot is not None:
        need_matplotlib()
        check_plot(plot)
    if out_dir is not None:
        check_output(out_dir, "--out", folder=True)
    factors = check_capacity_factors(tuple(capacity_factor)) if capacity_factor else DEFAULT_CAPACITY_FACTORS
    with output.spinner("Reading records…"):
        record = read_records(records, format.value, layers, top_k, experts)
        report = record_report(record, factors)
    if json_output:
        output.json(
            {"run": report.run, "layers": report.layers, "experts": report.experts, "coactivation": report.coactivation}
        )
    elif output.tables:
        render_balance(report, out)
    title = f"{record.format}: expert load / uniform (log2)"
    failures = save_report_and_heatmap(report.write, out_dir, lambda: report.experts, plot, title, output)
    if any(failures):
        raise UserError(" ".join(f for f in failures if f))
