"""`moe-inspect ablate`: language-model loss under routing changes, expert importance, per-expert gradients."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from moe_inspect.cli.common import Output, err, load_for_cli, out, save, user_errors
from moe_inspect.cli.options import JsonOpt, QuietOpt, flag, parse_layers, with_load_options
from moe_inspect.errors import UserError
from moe_inspect.model.options import LoadOptions

if TYPE_CHECKING:
    from moe_inspect.api import Inspector

ABLATE_EXAMPLES = """Examples:

  moe-inspect ablate corpus.txt --top-k 1 --dense

  moe-inspect ablate code.txt -m Qwen/Qwen3-30B-A3B --dtype bfloat16 --drop-experts '*:3' --drop-experts 5:0,5:7

  moe-inspect ablate corpus.txt --capacity-factor 1.0 --capacity-factor 1.25 --drop-policy probs --out runs/cf

  moe-inspect ablate corpus.txt --importance --layers 2 --max-tokens 20000 --out runs/importance

  moe-inspect ablate corpus.txt --gradients --max-tokens 20000
"""


class DropPolicy(str, Enum):
    position = "position"
    probs = "probs"


def _load(options: LoadOptions, output: Output, tokenizer: Any) -> Inspector:
    """The one place this command loads a model."""
    return load_for_cli(options, output, tokenizer)


@user_errors
@with_load_options()
def ablate(
    corpus: Annotated[list[str], typer.Argument(help="UTF-8 text files; '-' reads standard input.")],
    load: LoadOptions,
    top_k: Annotated[
        list[int] | None, typer.Option("--top-k", help="Every MoE layer uses K experts (repeatable; 1 .. E).")
    ] = None,
    dense: Annotated[bool, flag("--dense", help="Every MoE layer uses all its experts.")] = False,
    drop_experts: Annotated[
        list[str] | None,
        typer.Option("--drop-experts", help="Remove experts: LAYER:EXPERT items, '*' = every MoE layer (repeatable)."),
    ] = None,
    capacity_factor: Annotated[
        list[float] | None,
        typer.Option("--capacity-factor", help="Enforce expert capacity ceil(X*T*k/E) per batch (repeatable)."),
    ] = None,
    drop_policy: Annotated[
        DropPolicy, typer.Option("--drop-policy", help="Over capacity: earlier tokens win, or highest weights win.")
    ] = DropPolicy.position,
    importance: Annotated[
        bool, flag("--importance", help="Loss increase when each expert alone is removed (one pass each).")
    ] = False,
    layers: Annotated[
        str | None, typer.Option("--layers", help="Layers for --importance, e.g. '0,5-7' (default: every MoE layer).")
    ] = None,
    gradients: Annotated[
        bool, flag("--gradients", help="Per-expert gradient norm of the loss (one backward per batch).")
    ] = False,
    seq_len: Annotated[
        int | None, typer.Option("--seq-len", min=1, help="Window length (default min(2048, model max positions)).")
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Sequences per forward pass.")] = 4,
    lines: Annotated[
        bool, flag("--lines", help="Each non-empty line is its own sequence (padded batches).")
    ] = False,
    max_tokens: Annotated[int | None, typer.Option("--max-tokens", min=1, help="Stop after this many tokens.")] = None,
    out_dir: Annotated[
        Path | None,
        typer.Option("--out", help="Write ablation.csv, ablation_layers.csv, importance.csv, gradients.csv, run.json."),
    ] = None,
    html: Annotated[Path | None, typer.Option("--html", help="Write a self-contained HTML report.")] = None,
    quiet: QuietOpt = False,
    json_output: JsonOpt = False,
) -> None:
    """Measure the language-model loss under routing changes, each against the unchanged model on the same batches."""
    from moe_inspect.analysis.ablate import build_plan
    from moe_inspect.analysis.interventions import check_request
    from moe_inspect.cli.progress import progress_bar
    from moe_inspect.io.corpus import Batch, CorpusReader, check_files
    from moe_inspect.io.export import check_output
    from moe_inspect.model.source import check_seq_len, load_tokenizer, max_positions, resolve_model
    from moe_inspect.render.ablate import render_ablation

    output = Output(quiet, json_output)
    if layers is not None and not importance:
        raise UserError("--layers chooses the layers of --importance; add --importance.")
    if out_dir is not None:
        check_output(out_dir, "--out", folder=True)
    if html is not None:
        check_output(html, "--html")
    check_request(top_k or (), drop_experts or (), capacity_factor or ())  # the rest needs the model
    files = check_files(corpus)
    model_id, _ = resolve_model(load.model)
    tokenizer = load_tokenizer(model_id, load.revision, load.trust_remote_code)
    seq_len = check_seq_len(seq_len, max_positions(model_id, load.revision, load.trust_remote_code))
    reader = CorpusReader(files, tokenizer, seq_len, batch_size, lines, max_tokens)
    reader.check_long_enough()
    insp = _load(load, output, tokenizer)
    options = {
        "top_k": top_k or (), "dense": dense, "drop_experts": drop_experts or (),
        "capacity_factors": capacity_factor or (), "drop_policy": drop_policy.value, "importance": importance,
        "layers": parse_layers(layers), "gradients": gradients,
    }
    plan = build_plan(insp.loaded, **options)  # refuses bad specs before any model pass
    passes = plan.passes_per_batch({spec.layer: spec.num_experts for spec in insp.loaded.routers})
    if passes > 1:
        extra = f", {len(plan.importance_layers)} layer(s) of experts removed one at a time" if importance else ""
        output.status(
            f"Cost: {passes} decoder passes per batch (baseline, {len(plan.changes)} setting(s){extra}"
            f"{', one forward-backward' if gradients else ''}): about {passes}x one pass over the corpus."
        )
    total = reader.total_bytes if max_tokens is None else max_tokens
    detail = "{task.fields[tokens]:,} tokens · pass {task.fields[pass_]}/{task.fields[passes]}"
    with progress_bar("ablating", detail, quiet=quiet) as progress:
        task = progress.add_task("ablating", total=total, tokens=0, pass_=0, passes=passes)
        state = {"tokens": 0, "base": 0}

        def advance(batch: Batch, done: int, of: int) -> None:
            if done == of:
                state["tokens"] += batch.tokens
                state["base"] = batch.bytes_done if max_tokens is None else state["tokens"]
                progress.update(task, completed=state["base"], tokens=state["tokens"], pass_=done)
            else:  # within a batch: interpolate so the ETA moves with every pass
                step = (batch.bytes_done if max_tokens is None else state["tokens"] + batch.tokens) - state["base"]
                progress.update(task, completed=state["base"] + step * done / of, pass_=done)

        report = insp.ablate(
            reader=reader, progress=advance, **{k: v for k, v in options.items() if k != "layers"},
            layers=options["layers"],
        )
    if json_output:
        output.json(
            {
                "run": report.run, "ablation": report.ablation, "ablation_layers": report.layers,
                "importance": report.importance, "gradients": report.gradients,
            }
        )
    elif output.tables:
        render_ablation(report, out)
    failures = [save(report.write, out_dir, "--out", output) if out_dir is not None else None]
    if html is not None:
        from moe_inspect.render.html import write_html
        from moe_inspect.render.html.ablate import ablate_html

        title = f"{insp.loaded.model_id}: what the routing is worth"
        page = ablate_html(report.ablation, report.importance, title=title)
        failures.append(save(lambda path: write_html(page, path), html, "--html", output))
    if any(failures):
        raise UserError(" ".join(f for f in failures if f))
    if report.partial:
        err.print("[yellow]Interrupted:[/yellow] the figures cover the batches completed before Ctrl-C.")
        raise typer.Exit(130)
