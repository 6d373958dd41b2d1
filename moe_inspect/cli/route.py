"""`moe-inspect route`: which experts each token of a prompt went to, layer by layer."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from moe_inspect.cli.common import err, load_for_cli, out, user_errors
from moe_inspect.cli.options import (
    DeviceMapOpt,
    DeviceOpt,
    DoubleQuantOpt,
    Dtype,
    DtypeOpt,
    LoadIn4bitOpt,
    LoadIn8bitOpt,
    ModelOpt,
    QuantizeOpt,
    QuantTypeOpt,
    RevisionOpt,
    TrustRemoteCodeOpt,
    parse_layers,
)
from moe_inspect.errors import UserError
from moe_inspect.export import write_csv
from moe_inspect.model.quantize import QuantOptions
from moe_inspect.render.route import render_route

ROUTE_EXAMPLES = """Examples:

  moe-inspect route "def add(a, b): return a + b"

  moe-inspect route "The capital of France is" -m mistralai/Mixtral-8x7B-v0.1 --dtype bfloat16 --layers 0,15-17

  cat prompt.txt | moe-inspect route - -m Qwen/Qwen1.5-MoE-A2.7B --csv routes.csv

  moe-inspect route "Once upon a time" --generate 20 --csv story.csv
"""


@user_errors
def route(
    prompt: Annotated[str, typer.Argument(help="Text to route; '-' reads it from standard input.")],
    model: ModelOpt = None,
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
    seed: Annotated[int | None, typer.Option("--seed", help="Random seed for sampling.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Do not print the table (use with --csv).")] = False,
    dtype: DtypeOpt = Dtype.auto,
    device: DeviceOpt = "auto",
    revision: RevisionOpt = None,
    trust_remote_code: TrustRemoteCodeOpt = False,
    device_map: DeviceMapOpt = None,
    load_in_4bit: LoadIn4bitOpt = False,
    load_in_8bit: LoadIn8bitOpt = False,
    bnb_4bit_quant_type: QuantTypeOpt = "nf4",
    double_quant: DoubleQuantOpt = False,
    quantize: QuantizeOpt = None,
) -> None:
    """Show the token-to-expert table: for every token and MoE layer, the experts chosen and their weights.
    """
    text = sys.stdin.read() if prompt == "-" else prompt
    if not text.strip():
        raise UserError("The prompt is empty.")
    selected = parse_layers(layers)
    quant = QuantOptions.from_flags(load_in_4bit, load_in_8bit, bnb_4bit_quant_type, double_quant, quantize)
    insp = load_for_cli(model, dtype.value, device, revision, trust_remote_code, device_map, quant=quant)
    if selected is not None:
        known = {spec.layer for spec in insp.loaded.routers}
        if not selected & known:
            raise UserError(
                f"--layers {layers} matches no MoE layer; this model has MoE layers "
                f"{', '.join(map(str, sorted(known)))}."
            )
    frame = insp.route(text, generate=generate, temperature=temperature, seed=seed, layers=selected)
    if not quiet:
        render_route(frame, out)
    if csv is not None:
        write_csv(frame, csv)
        err.print(f"Wrote {len(frame)} rows to {csv}")

