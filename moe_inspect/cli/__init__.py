"""The `moe-inspect` command line: parses options, calls the library, renders. Nothing else.

Command modules import the library inside their functions, so `--help` and option errors stay instant.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer
from typer.core import TyperCommand, TyperGroup

from moe_inspect import __version__
from moe_inspect.cli.ablate import ABLATE_EXAMPLES, ablate
from moe_inspect.cli.balance import BALANCE_EXAMPLES, balance
from moe_inspect.cli.common import exit_cleanly_on_sigterm
from moe_inspect.cli.compare import COMPARE_EXAMPLES, compare
from moe_inspect.cli.info import INFO_EXAMPLES, info
from moe_inspect.cli.ingest import INGEST_EXAMPLES, ingest
from moe_inspect.cli.options import flag
from moe_inspect.cli.plan import PLAN_EXAMPLES, plan
from moe_inspect.cli.route import ROUTE_EXAMPLES, route


class _FlagHelp:
    """--help is a flag like any other: no '<bool>' value shown for it."""

    def get_help_option(self, ctx: Any) -> Any:
        option = super().get_help_option(ctx)  # type: ignore[misc]
        if option is not None:
            option.metavar = ""
        return option


class _Command(_FlagHelp, TyperCommand):
    pass


class _Group(_FlagHelp, TyperGroup):
    pass


app = typer.Typer(
    cls=_Group,
    name="moe-inspect",
    help="See what the routers of a Mixture-of-Experts model do: per-token routes, expert load, model size.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
    rich_markup_mode="rich",
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"moe-inspect {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        flag("--version", callback=_print_version, is_eager=True, help="Print the version and exit."),
    ] = False,
) -> None:
    """See what the routers of a Mixture-of-Experts model do: per-token routes, expert load, model size."""


app.command(epilog=ROUTE_EXAMPLES, cls=_Command)(route)
app.command(epilog=BALANCE_EXAMPLES, cls=_Command)(balance)
app.command(epilog=COMPARE_EXAMPLES, cls=_Command)(compare)
app.command(epilog=INFO_EXAMPLES, cls=_Command)(info)
app.command(epilog=ABLATE_EXAMPLES, cls=_Command)(ablate)
app.command(epilog=INGEST_EXAMPLES, cls=_Command)(ingest)
app.command(epilog=PLAN_EXAMPLES, cls=_Command)(plan)


def main() -> None:
    """Console-script entry point (also `python -m moe_inspect`, which should not call itself 'python -m')."""
    exit_cleanly_on_sigterm()
    app(prog_name="moe-inspect")
