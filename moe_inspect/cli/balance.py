"""`moe-inspect balance`: expert load, entropy, balance and capacity what-ifs over a corpus."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from moe_inspect.balance import DEFAULT_CAPACITY_FACTORS
from moe_inspect.cli.common import err, load_for_cli, out, user_errors
from moe_inspect.cli.options import (
    DeviceMapOpt,
    DeviceOpt,
    Dtype,
    DtypeOpt,
    LoadIn4bitOpt,
    LoadIn8bitOpt,
    ModelOpt,
    RevisionOpt,
    TrustRemoteCodeOpt,
)
from moe_inspect.corpus import Batch, CorpusReader, check_files
from moe_inspect.errors import UserError
from moe_inspect.loading import load_tokenizer, max_positions, resolve_model
from moe_inspect.render.balance import overall, render_balance, write_heatmap_png

BALANCE_EXAMPLES = """Examples:

  moe-inspect balance corpus.txt

  moe-inspect balance code.txt prose.txt -m allenai/OLMoE-1B-7B-0924 --dtype bfloat16 --out runs/olmoe

  moe-inspect balance chats.txt --lines --batch-size 16 --max-tokens 200000 --capacity-factor 1.0 --capacity-factor 1.5

  zcat big.txt.gz | moe-inspect balance - --plot load.png
"""


@user_errors
def balance(
    corpus: Annotated[list[str], typer.Argument(help="UTF-8 text files; '-' reads standard input.")],
    model: ModelOpt = None,
    seq_len: Annotated[
        int | None, typer.Option("--seq-len", min=1, help="Window length (default min(2048, model max positions)).")
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Sequences per forward pass.")] = 4,
    lines: Annotated[
        bool, typer.Option("--lines", help="Each non-empty line is its own sequence (padded batches).")
    ] = False,
    max_tokens: Annotated[int | None, typer.Option("--max-tokens", min=1, help="Stop after this many tokens.")] = None,
    capacity_factor: Annotated[
        list[float] | None,
        typer.Option("--capacity-factor", help="Capacity factors for drop-rate what-ifs (repeatable).", min=0.0),
    ] = None,
    out_dir: Annotated[
        Path | None, typer.Option("--out", help="Write layers.csv, experts.csv, coactivation.csv and run.json here.")
    ] = None,
    plot: Annotated[Path | None, typer.Option("--plot", help="Write the load heatmap as a PNG (matplotlib).")] = None,
    by_file: Annotated[
        bool,
        typer.Option(
            "--by-file", help="Measure each file on its own too: a source column, one block per file plus 'all'."
        ),
    ] = False,
    dtype: DtypeOpt = Dtype.auto,
    device: DeviceOpt = "auto",
    revision: RevisionOpt = None,
    trust_remote_code: TrustRemoteCodeOpt = False,
    device_map: DeviceMapOpt = None,
    load_in_4bit: LoadIn4bitOpt = False,
    load_in_8bit: LoadIn8bitOpt = False,
) -> None:
    """Measure per-layer expert load, routing entropy, balance and capacity drop rates over a corpus."""
    if plot is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise UserError("--plot needs matplotlib: pip install 'moe-inspect[plot]'.") from None
    if out_dir is not None and out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir} exists and is not a directory.")
    files = check_files(corpus)
    model_id, _ = resolve_model(model)
    tokenizer = load_tokenizer(model_id, revision, trust_remote_code)
    if seq_len is None:
        seq_len = min(2048, max_positions(model_id, revision, trust_remote_code) or 2048)
    reader = CorpusReader(files, tokenizer, seq_len, batch_size, lines, max_tokens)
    reader.check_long_enough()
    factors = tuple(capacity_factor) if capacity_factor else DEFAULT_CAPACITY_FACTORS
    insp = load_for_cli(
        model, dtype.value, device, revision, trust_remote_code, device_map, load_in_4bit, load_in_8bit, tokenizer
    )
    total = reader.total_bytes if max_tokens is None else max_tokens
    with Progress(
        TextColumn("[bold]routing"),
        BarColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[tokens]:,} tokens · {task.fields[rate]:,.0f} tok/s"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=True,
    ) as progress:
        task = progress.add_task("routing", total=total, tokens=0, rate=0.0)

        def advance(batch: Batch) -> None:
            done = progress.tasks[task].fields["tokens"] + batch.tokens
            elapsed = progress.tasks[task].elapsed or 1e-9
            progress.update(
                task,
                completed=batch.bytes_done if max_tokens is None else done,
                tokens=done,
                rate=done / elapsed,
            )

        report = insp.balance(reader=reader, capacity_factors=factors, progress=advance, by_file=by_file)
    render_balance(report, out)
    if out_dir is not None:
        written = report.write(out_dir)
        err.print(f"Wrote {', '.join(p.name for p in written)} to {out_dir}")
    if plot is not None:
        write_heatmap_png(overall(report.experts), plot, title=f"{insp.loaded.model_id}: expert load / uniform (log2)")
        err.print(f"Wrote {plot}")
    if report.partial:
        err.print("[yellow]Interrupted:[/yellow] the figures cover the batches routed before Ctrl-C.")
        raise typer.Exit(130)

