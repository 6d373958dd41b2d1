"""`moe-inspect info`: architecture, total vs active parameters and weight memory, from the config alone."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from moe_inspect.cli.common import Output, out, save, user_errors
from moe_inspect.cli.options import JsonOpt, QuietOpt, RevisionOpt, TrustRemoteCodeOpt
from moe_inspect.errors import UserError
from moe_inspect.model.options import LoadOptions

INFO_EXAMPLES = """Examples:

  moe-inspect info mistralai/Mixtral-8x7B-v0.1

  moe-inspect info ./my-checkpoint

  moe-inspect info fixtures/configs/deepseek-v3/config.json --json

  moe-inspect info Qwen/Qwen1.5-MoE-A2.7B --html qwen.html
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
    json_output: JsonOpt = False,
    quiet: QuietOpt = False,
    html: Annotated[Path | None, typer.Option("--html", help="Write a self-contained HTML report.")] = None,
    revision: RevisionOpt = None,
    trust_remote_code: TrustRemoteCodeOpt = False,
) -> None:
    """Size up an MoE model from its config alone: MoE and dense layers, experts and k, the routing rule,
    total / routed-expert / active parameters and weight memory. No weights are downloaded or loaded.
    """
    from transformers.utils import logging as hf_logging

    from moe_inspect.analysis.info import describe
    from moe_inspect.io.export import check_output
    from moe_inspect.model.source import load_config, resolve_model
    from moe_inspect.render.extras import info_page
    from moe_inspect.render.html import write_html
    from moe_inspect.render.info import render_info

    output = Output(quiet, json_output)
    if html is not None:
        check_output(html, "--html")
    hf_logging.set_verbosity_error()  # config-conversion chatter would bury the one panel asked for
    options = LoadOptions(model=model, revision=revision, trust_remote_code=trust_remote_code)
    model_id, is_default = resolve_model(options.model)
    if is_default:
        output.status("Using the small demo model shipped with moe-inspect; pass MODEL for a real checkpoint.")
    config = load_config(model_id, revision=options.revision, trust_remote_code=options.trust_remote_code)
    with output.spinner("Building the model on the meta device…"):
        result = describe(config, trust_remote_code=options.trust_remote_code)
    if json_output:
        output.json(result.to_dict())
    elif output.tables:
        render_info(result, out)
    if html is not None:
        page = info_page(result, model_id)
        failure = save(lambda path: write_html(page, path), html, "--html", output)
        if failure:
            raise UserError(failure)
