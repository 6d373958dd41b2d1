"""`moe-inspect compare`: routing drift between two models on the same tokens, or between two balance runs."""

from __future__ import annotations

from dataclasses import fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

from moe_inspect.cli.common import Output, err, load_for_cli, out, save, user_errors
from moe_inspect.cli.options import JsonOpt, QuietOpt, flag, with_load_options
from moe_inspect.errors import UserError
from moe_inspect.model.options import LoadOptions

if TYPE_CHECKING:
    from moe_inspect.io.corpus import CorpusReader

COMPARE_EXAMPLES = """Examples:

  moe-inspect compare corpus.txt -m mistralai/Mixtral-8x7B-v0.1 --dtype bfloat16 --against-load-in-4bit

  moe-inspect compare corpus.txt -m Qwen/Qwen1.5-MoE-A2.7B --against ./my-finetune --out runs/drift

  moe-inspect compare runs/code runs/prose --out runs/code-vs-prose
"""

AGAINST_PANEL = "Model B (compare)"

# Model B's help: each option is the first model's unless given (issue 15: "--against defaults to the first model").
_AGAINST_HELP = {
    "model": "Model B: Hub id or local folder. Default: the first model (e.g. to compare it quantized).",
    "dtype": "Model B's weight dtype. Default: --dtype.",
    "device": "Model B's device. Default: --device.",
    "revision": "Model B's Git revision. Default: --revision when --against is not given.",
    "trust_remote_code": "Allow model B's own Python code to run. Default: --trust-remote-code.",
    "device_map": "Model B's accelerate device map. Default: --device-map.",
    "load_in_4bit": "Quantize model B with bitsandbytes nf4. Default (neither B flag given): A's quantization.",
    "load_in_8bit": "Quantize model B with bitsandbytes int8. Default (neither B flag given): A's quantization.",
}
_QUANTIZATION = {"load_in_4bit", "load_in_8bit"}


def model_b_options(a: LoadOptions, b: LoadOptions, given: set[str]) -> LoadOptions:
    """Model B's options: each field B was not given is A's.

    A revision names a commit of one repository, so B inherits it only when B is A's model; the two
    quantization flags are one choice, so giving either leaves A's out.
    """
    same_model = "model" not in given
    inherited: dict[str, Any] = {}
    for name in (f.name for f in fields(LoadOptions)):
        if name in given or (name == "revision" and not same_model):
            continue
        if name in _QUANTIZATION and given & _QUANTIZATION:
            continue
        inherited[name] = getattr(a, name)
    return replace(b, **inherited)


def _given(ctx: typer.Context, prefix: str) -> set[str]:
    """The loading fields given on the command line (not left at their defaults) for the ``prefix`` group."""
    names = [f.name for f in fields(LoadOptions)]
    sources = {name: ctx.get_parameter_source(prefix + name) for name in names}
    return {name for name, source in sources.items() if source is not None and source.name != "DEFAULT"}


def _compare_runs(dir_a: str, dir_b: str, out_dir: Path | None, output: Output) -> Any:
    from moe_inspect.analysis.compare_runs import compare_runs
    from moe_inspect.render.compare import render_runs

    report = compare_runs(dir_a, dir_b)
    if output.json_output:
        output.json({"run": report.run, "layers": report.layers, "experts": report.experts})
    elif output.tables:
        render_runs(report, out)
    if out_dir is not None:
        failure = save(report.write, out_dir, "--out", output)
        if failure:
            raise UserError(failure)
    return report


@user_errors
@with_load_options(prefix="against-", dest="against", panel=AGAINST_PANEL, helps=_AGAINST_HELP)
@with_load_options()
def compare(
    ctx: typer.Context,
    inputs: Annotated[
        list[str],
        typer.Argument(
            help="Corpus files ('-' for standard input) to run both models over; or two `balance --out` folders "
            "to compare their loads without loading any model.",
            show_default=False,
        ),
    ],
    load: LoadOptions,
    against: LoadOptions,
    seq_len: Annotated[
        int | None, typer.Option("--seq-len", min=1, help="Window length (default min(2048, model max positions)).")
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Sequences per forward pass.")] = 4,
    lines: Annotated[bool, flag("--lines", help="Each non-empty line is its own sequence (padded batches).")] = False,
    max_tokens: Annotated[int | None, typer.Option("--max-tokens", min=1, help="Stop after this many tokens.")] = None,
    out_dir: Annotated[
        Path | None, typer.Option("--out", help="Write compare_layers.csv, compare_experts.csv and run.json here.")
    ] = None,
    per_token: Annotated[
        Path | None,
        typer.Option("--per-token", help="Stream one row per token and layer with both top-k sets (.csv or .parquet)."),
    ] = None,
    together: Annotated[
        bool, flag("--together", help="Hold both models at once and run them batch by batch (no on-disk record).")
    ] = False,
    scratch: Annotated[
        Path | None,
        typer.Option("--scratch", help="Folder for model A's temporary record (default: the system temp folder)."),
    ] = None,
    html: Annotated[Path | None, typer.Option("--html", help="Write a self-contained HTML report.")] = None,
    quiet: QuietOpt = False,
    json_output: JsonOpt = False,
) -> None:
    """Compare two models' routing of the same tokens (agreement, overlap, JS, load and output drift), or the
    expert loads of two `balance` runs. One model is in memory at a time unless --together.
    """
    from moe_inspect.io.export import check_output

    output = Output(quiet, json_output)
    if out_dir is not None:
        check_output(out_dir, "--out", folder=True)
    if html is not None:
        check_output(html, "--html")
    if len(inputs) == 2 and all(Path(p).is_dir() for p in inputs):
        report = _compare_runs(inputs[0], inputs[1], out_dir, output)
        if html is not None:
            _write_html(report, (Path(inputs[0]).name or inputs[0], Path(inputs[1]).name or inputs[1]), html, output)
        return
    against = model_b_options(load, against, _given(ctx, "against_"))
    report = _compare_models(
        inputs, load, against, seq_len, batch_size, lines, max_tokens, out_dir, per_token, together, scratch, output
    )
    if html is not None and report is not None:  # other torchrun ranks return None: rank 0 writes
        labels = (_label(report.run.get("model_a"), "A"), _label(report.run.get("model_b"), "B"))
        _write_html(report, labels, html, output)


def _label(described: Any, default: str) -> str:
    """A model's name for the page: its id (with the loading mode where it says one), else ``default``."""
    if not isinstance(described, dict):
        return default
    mode = described.get("quantization")
    return f"{described.get('model', default)}{f' ({mode})' if mode else ''}"


def _write_html(report: Any, labels: tuple[str, str], path: Path, output: Output) -> None:
    """The compare page (render.html.compare) from the report's tables, written like every other output."""
    from moe_inspect.render.html import write_html
    from moe_inspect.render.html.compare import compare_html

    summary = getattr(report, "summary", None)
    page = compare_html(report.layers, report.experts, summary, labels=labels)
    failure = save(lambda target: write_html(page, target), path, "--html", output)
    if failure:
        raise UserError(failure)


def _compare_models(
    inputs: list[str],
    options_a: LoadOptions,
    options_b: LoadOptions,
    seq_len: int | None,
    batch_size: int,
    lines: bool,
    max_tokens: int | None,
    out_dir: Path | None,
    per_token: Path | None,
    together: bool,
    scratch: Path | None,
    output: Output,
) -> Any:
    from moe_inspect.analysis import distributed
    from moe_inspect.analysis.compare import Interrupted, check_same_tokenizer, precheck_same_moe
    from moe_inspect.analysis.compare_tokens import PerTokenWriter, check_target
    from moe_inspect.io.corpus import CorpusReader, check_files
    from moe_inspect.io.export import check_output
    from moe_inspect.model.source import check_seq_len, load_tokenizer, max_positions, resolve_model
    from moe_inspect.render.compare import render_compare

    if per_token is not None and distributed.enabled():
        raise UserError("--per-token is written by one process only: run compare without torchrun to write it.")
    if per_token is not None:
        check_output(per_token, "--per-token")
        check_target(per_token)
    files = check_files(inputs)
    ids = [resolve_model(o.model)[0] for o in (options_a, options_b)]
    tokenizer_a = load_tokenizer(ids[0], options_a.revision, options_a.trust_remote_code)
    tokenizer_b = load_tokenizer(ids[1], options_b.revision, options_b.trust_remote_code)
    check_same_tokenizer(tokenizer_a, tokenizer_b)
    precheck_same_moe(ids[0], ids[1], options_a.revision, options_b.revision, options_a.trust_remote_code)
    seq_len = check_seq_len(seq_len, max_positions(ids[0], options_a.revision, options_a.trust_remote_code))
    reader = CorpusReader(files, tokenizer_a, seq_len, batch_size, lines, max_tokens)
    reader.check_long_enough()
    run_info = {"seq_len": seq_len, "batch_size": batch_size, "mode": reader.mode, "max_tokens": max_tokens}
    writer = PerTokenWriter(per_token, tokenizer_a) if per_token is not None else None
    distributed.setup()  # under torchrun: join the process group first, so each rank loads onto its own GPU
    # Under torchrun each rank compares its share of the batches; rank 0 alone shows progress and writes.
    shown = output if distributed.is_main() else Output(quiet=True)
    try:
        report = _run(
            reader, options_a, options_b, tokenizer_a, tokenizer_b, together, scratch, writer, run_info, shown
        )
    except BaseException as exc:
        if writer is not None:
            writer.abort()
        if isinstance(exc, Interrupted):
            err.print(f"[yellow]{exc}[/yellow]", soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None
        raise
    if not distributed.is_main():
        return None  # rank 0 holds the summed report and writes it once
    report.run["corpus"] = [f.describe() for f in reader.files]  # after the run: stdin is hashed as read
    if reader.mode != "lines":
        report.run["unrouted_tail_tokens"] = reader.unrouted_tail_tokens
    if output.json_output:
        output.json({"run": report.run, "layers": report.layers, "experts": report.experts, "summary": report.summary})
    elif output.tables:
        render_compare(report, out)
    failures = []
    if writer is not None:
        try:
            writer.commit()
            output.status(f"Wrote {writer.rows:,} per-token rows to {per_token}")
        except OSError as exc:
            writer.abort()
            failures.append(f"Could not write --per-token {per_token} ({exc.strerror or exc}).")
    if out_dir is not None:
        failures.append(save(report.write, out_dir, "--out", output))
    if any(failures):
        raise UserError(" ".join(f for f in failures if f))
    return report


def _run(
    reader: CorpusReader,
    options_a: LoadOptions,
    options_b: LoadOptions,
    tokenizer_a: Any,
    tokenizer_b: Any,
    together: bool,
    scratch: Path | None,
    writer: Any,
    run_info: dict[str, Any],
    output: Output,
) -> Any:
    """Both passes under one progress display on stderr."""
    from moe_inspect.analysis.compare import compare_together, compare_two_pass

    max_tokens = reader.max_tokens
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TextColumn("{task.completed:,.0f} tokens"),
        TimeElapsedColumn(),
        console=err,
        transient=True,
        disable=output.quiet,
    ) as progress:
        names = {"a": "model A", "b": "model B", "both": "A and B"}
        tasks: dict[str, Any] = {}
        record_tokens: dict[str, int] = {}

        def advance(phase: str, tokens: int) -> None:
            if phase not in tasks:
                total = record_tokens.get("tokens") if phase == "b" else max_tokens
                tasks[phase] = progress.add_task(names[phase], total=total)
            progress.advance(tasks[phase], tokens)

        def recorded(size: int, tokens: int) -> None:
            record_tokens["tokens"] = tokens
            output.status(
                f"Model A's record: {size / 2**20:,.1f} MiB on disk for {tokens:,} tokens "
                f"({size / max(tokens, 1):,.0f} bytes per token); model A released."
            )

        if together:
            insp_a = load_for_cli(options_a, output, tokenizer_a)
            insp_b = load_for_cli(options_b, output, tokenizer_b)
            return compare_together(
                insp_a.loaded, insp_b.loaded, reader.batches(), progress=advance, per_token=writer, run_info=run_info
            )
        return compare_two_pass(
            lambda: load_for_cli(options_a, output, tokenizer_a).loaded,
            lambda: load_for_cli(options_b, output, tokenizer_b).loaded,
            reader.batches(),
            scratch=scratch,
            progress=advance,
            per_token=writer,
            run_info=run_info,
            on_record=recorded,
        )
