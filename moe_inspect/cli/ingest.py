"""`moe-inspect ingest`: SGLang / vLLM routing records into balance's tables and terminal report."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from moe_inspect.analysis.ingest import record_report
from moe_inspect.balance import DEFAULT_CAPACITY_FACTORS
from moe_inspect.cli.common import err, out, user_errors
from moe_inspect.errors import UserError
from moe_inspect.io.engine_records import FORMATS, read_records
from moe_inspect.render.balance import render_balance, write_heatmap_png

INGEST_EXAMPLES = """Examples:

  moe-inspect ingest /tmp/expert_distribution_recorder_1732500000.pt --out runs/sglang

  moe-inspect ingest /tmp/expert_distribution_recorder_*_*.pt --out runs/per-token

  moe-inspect ingest routed.jsonl --layers 61 --top-k 8 --experts 256 --out runs/replay

  moe-inspect ingest routed_experts.npz --experts 128
"""

RecordFormat = Enum("RecordFormat", {name: name for name in ("auto", *FORMATS)}, type=str)  # type: ignore[misc]


@user_errors
def ingest(
    records: Annotated[list[Path], typer.Argument(help="Record files of one format (several ranks or requests).")],
    out_dir: Annotated[
        Path | None,
        typer.Option("--out", help="Write layers.csv, experts.csv, coactivation.csv (per-token) and run.json here."),
    ] = None,
    format: Annotated[
        RecordFormat, typer.Option("--format", help="Record format; auto detects it from the content.")
    ] = RecordFormat.auto,  # type: ignore[attr-defined]
    layers: Annotated[
        int | None, typer.Option("--layers", min=1, help="num_hidden_layers, for raw int32 routed experts.")
    ] = None,
    top_k: Annotated[
        int | None, typer.Option("--top-k", min=1, help="Experts per token; needed for raw int32, checked otherwise.")
    ] = None,
    experts: Annotated[
        int | None, typer.Option("--experts", min=1, help="Routed experts per layer, where only ids are recorded.")
    ] = None,
    capacity_factor: Annotated[
        list[float] | None,
        typer.Option("--capacity-factor", help="Capacity factors for drop-rate what-ifs (repeatable).", min=0.0),
    ] = None,
    plot: Annotated[Path | None, typer.Option("--plot", help="Write the load heatmap as a PNG (matplotlib).")] = None,
) -> None:
    """Read SGLang expert-distribution dumps or vLLM/SGLang routed experts and report load like balance."""
    if out_dir is not None and out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir} exists and is not a directory.")
    record = read_records(records, format.value, layers, top_k, experts)
    factors = tuple(capacity_factor) if capacity_factor else DEFAULT_CAPACITY_FACTORS
    report = record_report(record, factors)
    render_balance(report, out)
    if out_dir is not None:
        written = report.write(out_dir)
        err.print(f"Wrote {', '.join(p.name for p in written)} to {out_dir}")
    if plot is not None:
        write_heatmap_png(report.experts, plot, title=f"{record.format}: expert load / uniform (log2)")
        err.print(f"Wrote {plot}")
