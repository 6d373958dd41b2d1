"""`moe-inspect compare`: routing drift between two models on the same tokens, or between two balance runs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

from moe_inspect.cli.common import err, load_for_cli, out, user_errors
from moe_inspect.cli.options import (
    AgainstDeviceMapOpt,
    AgainstDeviceOpt,
    AgainstDtypeOpt,
    AgainstLoadIn4bitOpt,
    AgainstLoadIn8bitOpt,
    AgainstOpt,
    AgainstRevisionOpt,
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
from moe_inspect.errors import UserError

COMPARE_EXAMPLES = """Examples:

  moe-inspect compare corpus.txt -m mistralai/Mixtral-8x7B-v0.1 --dtype bfloat16 --against-load-in-4bit

  moe-inspect compare corpus.txt -m Qwen/Qwen1.5-MoE-A2.7B --against ./my-finetune --out runs/drift

  moe-inspect compare runs/code runs/prose --out runs/code-vs-prose
"""


def model_options(
    model: str | None,
    dtype: str,
    device: str,
    revision: str | None,
    trust_remote_code: bool,
    device_map: str | None,
    load_in_4bit: bool,
    load_in_8bit: bool,
) -> dict[str, Any]:
    """One model's load options (the single place to switch to a LoadOptions value)."""
    return {
        "model": model,
        "dtype": dtype,
        "device": device,
        "revision": revision,
        "trust_remote_code": trust_remote_code,
        "device_map": device_map,
        "load_in_4bit": load_in_4bit,
        "load_in_8bit": load_in_8bit,
    }


def _check_out(out_dir: Path | None) -> None:
    if out_dir is not None and out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir} exists and is not a directory.")


def _compare_runs(dir_a: str, dir_b: str, out_dir: Path | None) -> None:
    from moe_inspect.analysis.compare_runs import compare_runs
    from moe_inspect.render.compare import render_runs

    report = compare_runs(dir_a, dir_b)
    render_runs(report, out)
    if out_dir is not None:
        written = report.write(out_dir)
        err.print(f"Wrote {', '.join(p.name for p in written)} to {out_dir}")


@user_errors
def compare(
    inputs: Annotated[
        list[str],
        typer.Argument(
            help="Corpus files ('-' for standard input) to run both models over; or two `balance --out` folders "
            "to compare their loads without loading any model.",
            show_default=False,
        ),
    ],
    model: ModelOpt = None,
    against: AgainstOpt = None,
    seq_len: Annotated[
        int | None, typer.Option("--seq-len", min=1, help="Window length (default min(2048, model max positions)).")
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Sequences per forward pass.")] = 4,
    lines: Annotated[
        bool, typer.Option("--lines", help="Each non-empty line is its own sequence (padded batches).")
    ] = False,
    max_tokens: Annotated[int | None, typer.Option("--max-tokens", min=1, help="Stop after this many tokens.")] = None,
    out_dir: Annotated[
        Path | None, typer.Option("--out", help="Write compare_layers.csv, compare_experts.csv and run.json here.")
    ] = None,
    per_token: Annotated[
        Path | None,
        typer.Option("--per-token", help="Stream one row per token and layer with both top-k sets (.csv or .parquet)."),
    ] = None,
    together: Annotated[
        bool,
        typer.Option("--together", help="Hold both models at once and run them batch by batch (no on-disk record)."),
    ] = False,
    scratch: Annotated[
        Path | None,
        typer.Option("--scratch", help="Folder for model A's temporary record (default: the system temp folder)."),
    ] = None,
    dtype: DtypeOpt = Dtype.auto,
    device: DeviceOpt = "auto",
    revision: RevisionOpt = None,
    trust_remote_code: TrustRemoteCodeOpt = False,
    device_map: DeviceMapOpt = None,
    load_in_4bit: LoadIn4bitOpt = False,
    load_in_8bit: LoadIn8bitOpt = False,
    against_dtype: AgainstDtypeOpt = None,
    against_device: AgainstDeviceOpt = None,
    against_revision: AgainstRevisionOpt = None,
    against_device_map: AgainstDeviceMapOpt = None,
    against_load_in_4bit: AgainstLoadIn4bitOpt = False,
    against_load_in_8bit: AgainstLoadIn8bitOpt = False,
) -> None:
    """Compare two models' routing of the same tokens (agreement, overlap, JS, load and output drift), or the
    expert loads of two `balance` runs. One model is in memory at a time unless --together.
    """
    _check_out(out_dir)
    if len(inputs) == 2 and all(Path(p).is_dir() for p in inputs):
        _compare_runs(inputs[0], inputs[1], out_dir)
        return
    options_a = model_options(
        model, dtype.value, device, revision, trust_remote_code, device_map, load_in_4bit, load_in_8bit
    )
    options_b = model_options(
        against or model,
        (against_dtype or dtype).value,
        against_device or device,
        against_revision if against_revision is not None else (revision if against is None else None),
        trust_remote_code,
        against_device_map if against_device_map is not None else (device_map if against is None else None),
        against_load_in_4bit,
        against_load_in_8bit,
    )
    _compare_models(
        inputs, options_a, options_b, seq_len, batch_size, lines, max_tokens, out_dir, per_token, together, scratch
    )


def _compare_models(
    inputs: list[str],
    options_a: dict[str, Any],
    options_b: dict[str, Any],
    seq_len: int | None,
    batch_size: int,
    lines: bool,
    max_tokens: int | None,
    out_dir: Path | None,
    per_token: Path | None,
    together: bool,
    scratch: Path | None,
) -> None:
    from moe_inspect.analysis.compare import (
        Interrupted,
        check_same_tokenizer,
        compare_together,
        compare_two_pass,
        precheck_same_moe,
    )
    from moe_inspect.analysis.compare_tokens import PerTokenWriter, check_target
    from moe_inspect.corpus import CorpusReader, check_files
    from moe_inspect.loading import load_tokenizer, max_positions, resolve_model
    from moe_inspect.render.compare import render_compare

    if per_token is not None:
        check_target(per_token)
    files = check_files(inputs)
    ids = [resolve_model(o["model"])[0] for o in (options_a, options_b)]
    tokenizer_a = load_tokenizer(ids[0], options_a["revision"], options_a["trust_remote_code"])
    tokenizer_b = load_tokenizer(ids[1], options_b["revision"], options_b["trust_remote_code"])
    check_same_tokenizer(tokenizer_a, tokenizer_b)
    precheck_same_moe(ids[0], ids[1], options_a["revision"], options_b["revision"], options_a["trust_remote_code"])
    if seq_len is None:
        seq_len = min(2048, max_positions(ids[0], options_a["revision"], options_a["trust_remote_code"]) or 2048)
    reader = CorpusReader(files, tokenizer_a, seq_len, batch_size, lines, max_tokens)
    reader.check_long_enough()
    run_info = {
        "corpus": [f.describe() for f in files],
        "seq_len": seq_len,
        "batch_size": batch_size,
        "mode": "lines" if lines else "packed",
        "max_tokens": max_tokens,
    }
    writer = PerTokenWriter(per_token, tokenizer_a) if per_token is not None else None
    try:
        with Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TaskProgressColumn(),
            TextColumn("{task.completed:,.0f} tokens"),
            TimeElapsedColumn(),
            console=err,
            transient=True,
        ) as progress:
            names = {"a": "model A", "b": "model B", "both": "A and B"}
            tasks: dict[str, Any] = {}

            def advance(phase: str, tokens: int) -> None:
                if phase not in tasks:
                    total = record_tokens.get("tokens") if phase == "b" else max_tokens
                    tasks[phase] = progress.add_task(names[phase], total=total)
                progress.advance(tasks[phase], tokens)

            record_tokens: dict[str, int] = {}

            def recorded(size: int, tokens: int) -> None:
                record_tokens["tokens"] = tokens
                err.print(
                    f"Model A's record: {size / 2**20:,.1f} MiB on disk for {tokens:,} tokens "
                    f"({size / max(tokens, 1):,.0f} bytes per token); model A released.",
                    soft_wrap=True,
                )

            if together:
                insp_a = load_for_cli(**options_a, tokenizer=tokenizer_a)
                insp_b = load_for_cli(**options_b, tokenizer=tokenizer_b)
                batches = reader.batches()
                report = compare_together(
                    insp_a.loaded, insp_b.loaded, batches, progress=advance, per_token=writer, run_info=run_info
                )
            else:
                report = compare_two_pass(
                    lambda: load_for_cli(**options_a, tokenizer=tokenizer_a).loaded,
                    lambda: load_for_cli(**options_b, tokenizer=tokenizer_b).loaded,
                    reader.batches(),
                    scratch=scratch,
                    progress=advance,
                    per_token=writer,
                    run_info=run_info,
                    on_record=recorded,
                )
    except BaseException as exc:
        if writer is not None:
            writer.abort()
        if isinstance(exc, Interrupted):
            err.print(f"[yellow]{exc}[/yellow]", soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None
        raise
    if not reader.lines:
        report.run["unrouted_tail_tokens"] = reader.unrouted_tail_tokens
    render_compare(report, out)
    if writer is not None:
        writer.commit()
        err.print(f"Wrote {writer.rows:,} per-token rows to {per_token}")
    if out_dir is not None:
        written = report.write(out_dir)
        err.print(f"Wrote {', '.join(p.name for p in written)} to {out_dir}")
