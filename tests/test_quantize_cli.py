"""The quantization flags on the command line: the status line reports the real footprint, bad combinations end
with one sentence and exit code 2 before any weight is read."""

from __future__ import annotations

from typing import Annotated

import pytest
import typer
from typer.testing import CliRunner

from moe_inspect.cli import app
from moe_inspect.cli.options import with_load_options
from moe_inspect.model.options import LoadOptions

pytest.importorskip("bitsandbytes")
runner = CliRunner()


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--double-quant"], "only apply to 4-bit loading"),
        (["--load-in-8bit", "--bnb-4bit-quant-type", "fp4"], "only apply to 4-bit loading"),
        (["--load-in-4bit", "--bnb-4bit-quant-type", "int3"], "must be nf4 or fp4, not 'int3'"),
        (["--quantize", "int3"], "--quantize must be one of float8, not 'int3'"),
        (["--quantize", "float8", "--load-in-4bit"], "Choose one of --quantize and --load-in-4bit/--load-in-8bit."),
    ],
)
def test_bad_quantization_flags_are_one_sentence(tiny_dir, flags: list[str], needle: str) -> None:
    for command in (["route", "hi"], ["balance", "-"]):
        result = runner.invoke(app, [*command, "-m", str(tiny_dir("mixtral")), *flags], input="some text\n")
        output = result.output + (result.stderr if result.stderr_bytes is not None else "")
        assert result.exit_code == 2, output
        assert "Traceback" not in output and needle in output, output


def test_status_line_reports_quantized_experts(tiny_dir) -> None:
    result = runner.invoke(
        app, ["route", "def add(a, b)", "-m", str(tiny_dir("mixtral")), "--load-in-4bit", "--double-quant"]
    )
    output = result.output + (result.stderr if result.stderr_bytes is not None else "")
    assert result.exit_code == 0, output
    line = next(line for line in output.splitlines() if line.startswith("4bit-nf4-dq: "))
    assert "in memory (real storage), routed experts" in line and "quantized; kept in full precision:" in line
    assert "routers" in line


def test_quantization_flags_are_load_options_with_the_against_prefix_too() -> None:
    """One LoadOptions per model carries the quantization; a second model's group gets the same flags, prefixed."""
    seen: dict[str, LoadOptions] = {}
    cli = typer.Typer()

    @cli.command()
    @with_load_options()
    @with_load_options(prefix="against-", dest="against", panel="Second model")
    def two(name: Annotated[str, typer.Argument()], load: LoadOptions, against: LoadOptions) -> None:
        seen.update(load=load, against=against)

    flags = ["x", "--load-in-4bit", "--bnb-4bit-quant-type", "fp4", "--double-quant", "--against-quantize", "float8"]
    result = runner.invoke(cli, flags)
    assert result.exit_code == 0, result.output
    assert seen["load"] == LoadOptions(load_in_4bit=True, bnb_4bit_quant_type="fp4", double_quant=True)
    assert seen["against"] == LoadOptions(quantize="float8")
    flags = {opt for param in typer.main.get_command(cli).params for opt in param.opts}
    assert {"--against-bnb-4bit-quant-type", "--against-double-quant", "--against-quantize"} <= flags
