"""`moe-inspect route`: which experts each token of a prompt went to, layer by layer."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from moe_inspect.cli.common import Output, load_for_cli, out, save, user_errors
from moe_inspect.cli.options import JsonOpt, QuietOpt, parse_layers, with_load_options
from moe_inspect.errors import UserError
from moe_inspect.model.options import LoadOptions

ROUTE_EXAMPLES = """Examples:

  moe-inspect route "def add(a, b): return a + b"

  moe-inspect route "The capital of France is" -m mistralai/Mixtral-8x7B-v0.1 --dtype bfloat16 --layers 0,15-17

  cat prompt.txt | moe-inspect route - -m Qwen/Qwen1.5-MoE-A2.7B --csv routes.csv

  moe-inspect route "Once upon a time" --generate 20 --csv story.csv

  moe-inspect route "def add(a, b): return a + b" --html route.html

  moe-inspect route "What is in the picture?" --image cat.png -m Qwen/Qwen3-VL-30B-A3B-Instruct --csv cat.csv
"""


def _strip_one_newline(text: str) -> str:
    """`echo hi | moe-inspect route -` should route 'hi', not 'hi' and a newline token."""
    for end in ("\r\n", "\n"):
        if text.endswith(end):
            return text[: -len(end)]
    return text


@user_errors
@with_load_options()
def route(
    prompt: Annotated[
        str,
        typer.Argument(help="Text to route; '-' reads it from standard input, less one trailing newline (echo's)."),
    ],
    load: LoadOptions,
    layers: Annotated[
        str | None, typer.Option("--layers", help="Decoder layers to show and export, e.g. '0,5-7'.")
    ] = None,
    csv: Annotated[
        Path | None, typer.Option("--csv", help="Write the long-format table (one row per token, layer, rank).")
    ] = None,
    generate: Annotated[
        int, typer.Option("--generate", min=0, help="Generate N tokens and route them too (greedy by default).")
    ] = 0,
    temperature: Annotated[
        float, typer.Option("--temperature", min=0.0, help="Sampling temperature for --generate; 0 is greedy.")
    ] = 0.0,
    seed: Annotated[
        int | None, typer.Option("--seed", help="Random seed for sampling (and NLLB-MoE's random expert policies).")
    ] = None,
    html: Annotated[Path | None, typer.Option("--html", help="Write a self-contained HTML report.")] = None,
    target: Annotated[
        str | None,
        typer.Option("--target", help="Encoder-decoder models: the decoder prefix to route (default: start token)."),
    ] = None,
    image: Annotated[
        list[Path] | None,
        typer.Option("--image", help="Vision-language models: an image to route with the prompt; repeat for several."),
    ] = None,
    quiet: QuietOpt = False,
    json_output: JsonOpt = False,
) -> None:
    """Show the token-to-expert table: for every token and MoE layer, the experts chosen and their weights.
    """
    from moe_inspect.io.export import check_output, write_csv
    from moe_inspect.model.source import check_prompt_length, load_tokenizer, max_positions, resolve_model
    from moe_inspect.render.extras import route_page
    from moe_inspect.render.html import write_html
    from moe_inspect.render.route import render_route

    output = Output(quiet, json_output)
    text = _strip_one_newline(sys.stdin.read()) if prompt == "-" else prompt
    if not text.strip():
        raise UserError("The prompt is empty.")
    selected = parse_layers(layers)
    if csv is not None:
        check_output(csv, "--csv")
    if html is not None:
        check_output(html, "--html")
    model_id, _ = resolve_model(load.model)
    processor = None
    if image:  # every refusal images can meet, before the weights load
        from moe_inspect.analysis.modality import check_image_run, prepare_images

        check_image_run(generate=generate)
        _, processor = prepare_images(load, model_id, image)
    tokenizer = load_tokenizer(model_id, load.revision, load.trust_remote_code)
    limit = max_positions(model_id, load.revision, load.trust_remote_code)
    check_prompt_length(len(tokenizer(text)["input_ids"]), generate, limit)  # before the weights load
    insp = load_for_cli(load, output, tokenizer)
    if processor is not None:
        insp.processor = processor
    frame = insp.route(
        text, generate=generate, temperature=temperature, seed=seed, layers=selected, target=target,
        images=image or None,
    )
    if json_output:
        output.json({**frame.attrs, "rows": frame})
    elif output.tables:
        render_route(frame, out)
    failures = [save(lambda path: write_csv(frame, path), csv, "--csv", output) if csv is not None else None]
    if html is not None:
        page = route_page(frame, insp.loaded.routers, insp.loaded.model_id)
        failures.append(save(lambda path: write_html(page, path), html, "--html", output))
    if any(failures):
        raise UserError(" ".join(f for f in failures if f))
