"""`moe-inspect balance`: expert load, entropy, balance and capacity what-ifs over a corpus."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from moe_inspect.cli.common import Output, err, load_for_cli, out, save, user_errors
from moe_inspect.cli.options import JsonOpt, QuietOpt, flag, parse_layers, with_load_options
from moe_inspect.errors import UserError
from moe_inspect.io.schemas import DEFAULT_CAPACITY_FACTORS
from moe_inspect.model.options import LoadOptions

# --help groups the options by what they are about.
CORPUS, MEASURE, OUTPUT = "Corpus", "What to measure", "Output"
SPECIAL = "Encoder-decoder and vision-language models"

BALANCE_EXAMPLES = """Examples:

  moe-inspect balance corpus.txt

  moe-inspect balance code.txt prose.txt -m allenai/OLMoE-1B-7B-0924 --dtype bfloat16 --out runs/olmoe

  moe-inspect balance chats.txt --lines --batch-size 16 --max-tokens 200000 --capacity-factor 1.0 --capacity-factor 1.5

  zcat big.txt.gz | moe-inspect balance - --plot load.png

  moe-inspect balance code.txt --top-tokens 8 --html balance.html

  moe-inspect balance prose.txt --images photos/ -m rhymes-ai/Aria --out runs/aria

  moe-inspect balance src.txt --lines --target-file tgt.txt -m google/switch-base-8 --out runs/switch
"""


@user_errors
@with_load_options()
def balance(
    load: LoadOptions,
    corpus: Annotated[
        list[str] | None, typer.Argument(help="UTF-8 text files; '-' reads standard input.", show_default=False)
    ] = None,
    seq_len: Annotated[
        int | None,
        typer.Option(
            "--seq-len", rich_help_panel=CORPUS, min=1, help="Window length (default min(2048, model max positions))."
        ),
    ] = None,
    batch_size: Annotated[
        int | None,
        typer.Option(
            "--batch-size",
            rich_help_panel=CORPUS,
            min=1,
            help="Sequences per forward pass (default: 8192 tokens on CPU; measured on CUDA).",
        ),
    ] = None,
    lines: Annotated[
        bool, flag("--lines", rich_help_panel=CORPUS, help="Each non-empty line is its own sequence (padded batches).")
    ] = False,
    max_tokens: Annotated[
        int | None, typer.Option("--max-tokens", rich_help_panel=CORPUS, min=1, help="Stop after this many tokens.")
    ] = None,
    capacity_factor: Annotated[
        list[float] | None,
        typer.Option(
            "--capacity-factor",
            rich_help_panel=MEASURE,
            help="Capacity factor for the drop-rate what-ifs; repeat it for several.",
            show_default=", ".join(f"{f:g}" for f in DEFAULT_CAPACITY_FACTORS),
        ),
    ] = None,
    out_dir: Annotated[
        Path | None,
        typer.Option(
            "--out", rich_help_panel=OUTPUT, help="Write layers.csv, experts.csv, coactivation.csv and run.json here."
        ),
    ] = None,
    plot: Annotated[
        Path | None,
        typer.Option(
            "--plot", rich_help_panel=OUTPUT, help="Write the load heatmap as .png, .pdf or .svg (matplotlib)."
        ),
    ] = None,
    top_tokens: Annotated[
        int,
        typer.Option(
            "--top-tokens",
            rich_help_panel=MEASURE,
            min=0,
            help="Per expert, the N most frequent and N highest-lift tokens.",
        ),
    ] = 0,
    min_count: Annotated[
        int,
        typer.Option(
            "--min-count", rich_help_panel=MEASURE, min=1, help="Least assignments for a token to be listed by lift."
        ),
    ] = 5,
    top_token_layers: Annotated[
        str | None,
        typer.Option(
            "--top-token-layers", rich_help_panel=MEASURE, help="Count tokens only in these layers, e.g. '0,5-7'."
        ),
    ] = None,
    html: Annotated[
        Path | None, typer.Option("--html", rich_help_panel=OUTPUT, help="Write a self-contained HTML report.")
    ] = None,
    by_file: Annotated[
        bool,
        flag(
            "--by-file",
            rich_help_panel=CORPUS,
            help="Measure each file on its own too: a source column, one block per file plus 'all'.",
        ),
    ] = False,
    target_file: Annotated[
        Path | None,
        typer.Option(
            "--target-file",
            rich_help_panel=SPECIAL,
            help="Encoder-decoders with --lines: the decoder's text for each source line, one a line.",
        ),
    ] = None,
    seed: Annotated[
        int | None,
        typer.Option("--seed", rich_help_panel=SPECIAL, help="Random seed (NLLB-MoE's random second-expert policies)."),
    ] = None,
    images: Annotated[
        Path | None,
        typer.Option(
            "--images",
            rich_help_panel=SPECIAL,
            help="Vision-language models: route each image file in this folder, by modality.",
        ),
    ] = None,
    image_prompt: Annotated[
        str | None,
        typer.Option(
            "--image-prompt",
            rich_help_panel=SPECIAL,
            help="Text routed after each image (default: a short neutral one).",
        ),
    ] = None,
    quiet: QuietOpt = False,
    json_output: JsonOpt = False,
) -> None:
    """Measure per-layer expert load, routing entropy, balance and capacity drop rates over a corpus."""
    from moe_inspect.analysis import distributed
    from moe_inspect.analysis.balance import check_capacity_factors
    from moe_inspect.analysis.batching import default_batch_size
    from moe_inspect.cli.heatmap import check_plot, need_matplotlib, save_report_and_heatmap
    from moe_inspect.io.corpus import Batch, CorpusReader, check_files
    from moe_inspect.io.export import check_output
    from moe_inspect.model.source import check_seq_len, load_tokenizer, max_positions, resolve_model
    from moe_inspect.render.balance import overall, render_balance
    from moe_inspect.render.extras import balance_page, balance_tables, render_balance_extras
    from moe_inspect.render.html import write_html

    output = Output(quiet, json_output)
    if plot is not None:
        need_matplotlib()
    if out_dir is not None:
        check_output(out_dir, "--out", folder=True)
    if plot is not None:
        check_plot(plot)
    if html is not None:
        check_output(html, "--html")
    token_layers = parse_layers(top_token_layers)
    if not corpus and images is None:
        raise UserError("Give text files to measure, or an image folder with --images.")
    if images is not None:
        from moe_inspect.analysis.modality import check_image_run

        check_image_run(by_file)
    files = check_files(corpus) if corpus else []
    model_id, _ = resolve_model(load.model)
    image_list, processor = [], None
    if images is not None:
        from moe_inspect.analysis.modality import prepare_images

        image_list, processor = prepare_images(load, model_id, images)
    tokenizer = load_tokenizer(model_id, load.revision, load.trust_remote_code)
    seq_len = check_seq_len(seq_len, max_positions(model_id, load.revision, load.trust_remote_code))
    reader = CorpusReader(files, tokenizer, seq_len, batch_size or 1, lines, max_tokens) if files else None
    factors = check_capacity_factors(tuple(capacity_factor)) if capacity_factor else DEFAULT_CAPACITY_FACTORS
    targets = None
    if target_file is not None:  # refused before the weights load: a decoder-only model, no --lines, line counts
        from moe_inspect.io.targets import check_aligned, target_source
        from moe_inspect.model.source import SEQ2SEQ, load_config, model_kind

        config = load_config(model_id, load.revision, load.trust_remote_code)
        targets = target_source(str(target_file), model_kind(config) == SEQ2SEQ)
        check_aligned(reader, targets)
    if reader is not None:
        reader.check_long_enough()  # after the target checks: without --lines, that is the sentence to read
    distributed.setup()  # under torchrun: join the process group first, so each rank loads onto its own GPU
    insp = load_for_cli(load, output if distributed.is_main() else Output(quiet=True), tokenizer)
    if processor is not None:
        insp.processor = processor
    if batch_size is None and reader is not None:
        reader.batch_size = default_batch_size(insp.loaded, seq_len)
    image_bytes = sum(f.stat().st_size for f in image_list)
    text_bytes = reader.total_bytes if reader is not None else 0
    total = max_tokens if max_tokens is not None else None if text_bytes is None else text_bytes + image_bytes
    from moe_inspect.cli.progress import progress_bar

    detail = "{task.fields[tokens]:,} tokens · {task.fields[rate]:,.0f} tok/s"
    with progress_bar("routing", detail, quiet=quiet) as progress:
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

        report = insp.balance(
            reader=reader,
            capacity_factors=factors,
            progress=advance,
            top_tokens=top_tokens,
            min_count=min_count,
            top_token_layers=token_layers,
            by_file=by_file,
            targets=targets,
            seed=seed,
            **(
                {"images": image_list, "image_prompt": image_prompt, "batch_size": batch_size, "max_tokens": max_tokens}
                if images is not None
                else {}
            ),
        )
    if not distributed.is_main():
        return  # rank 0 holds the reduced report and writes it once
    if json_output:
        output.json(balance_tables(report))
    elif output.tables:
        render_balance(report, out)
        render_balance_extras(report, out)
    title = f"{insp.loaded.model_id}: expert load / uniform (log2)"
    failures = save_report_and_heatmap(report.write, out_dir, lambda: overall(report.experts), plot, title, output)
    if html is not None:
        page = balance_page(report)
        failures.append(save(lambda path: write_html(page, path), html, "--html", output))
    if any(failures):
        raise UserError(" ".join(f for f in failures if f))
    if report.partial:
        err.print("[yellow]Interrupted:[/yellow] the figures cover the batches routed before Ctrl-C.")
        raise typer.Exit(130)
