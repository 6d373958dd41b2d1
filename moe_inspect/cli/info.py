"""`moe-inspect info`: architecture, total vs active parameters and weight memory, from the config alone."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from moe_inspect.cli.common import err, out, user_errors
from moe_inspect.cli.options import RevisionOpt, TrustRemoteCodeOpt
from moe_inspect.loading import resolve_model
from moe_inspect.params import describe, load_config
from moe_inspect.render.extras import info_extras
from moe_inspect.render.info import render_info

INFO_EXAMPLES = """Examples:

  moe-inspect info mistralai/Mixtral-8x7B-v0.1

  moe-inspect info ./my-checkpoint

  moe-inspect info fixtures/configs/deepseek-v3/config.json --json
"""


@user_errors
def info(
    model: Annotated[
        str | None,
        typer.Argument(
            help="Hub id (e.g. mistralai/Mixtral-8x7B-v0.1), local model folder, or path to a config.json. "
            "Default: $MOE_INSPECT_MODEL, else the demo model shipped with moe-inspect.",
            show_default=False,
        ),
    ] = None,
    json_output: Annotated[
        bool, typer.Option("--json", help="Print one JSON object instead of the panel (for scripts).")
    ] = False,
    html: Annotated[Path | None, typer.Option("--html", help="Write a self-contained HTML report.")] = None,
    revision: RevisionOpt = None,
    trust_remote_code: TrustRemoteCodeOpt = False,
) -> None:
    """Size up an MoE model from its config alone: MoE and dense layers, experts and k, the routing rule,
    total / routed-expert / active parameters and weight memory. No weights are downloaded or loaded.
    """
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # config-conversion chatter would bury the one panel asked for
    model, is_default = resolve_model(model)
    if is_default:
        err.print(
            "Using the small demo model shipped with moe-inspect; pass MODEL for a real checkpoint.", soft_wrap=True
        )
    config = load_config(model, revision=revision, trust_remote_code=trust_remote_code)
    with err.status("Building the model on the meta device…"):
        result = describe(config, trust_remote_code=trust_remote_code)
    info_extras(result, model, err, html)
    if json_output:
        print(json.dumps(result.to_dict(), indent=2))
        return
    render_info(result, out)
