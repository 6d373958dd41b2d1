"""The `moe-inspect` command line: parses options, calls the library, renders. Nothing else."""

from __future__ import annotations

import typer

from moe_inspect.cli.balance import BALANCE_EXAMPLES, balance
from moe_inspect.cli.compare import COMPARE_EXAMPLES, compare
from moe_inspect.cli.info import INFO_EXAMPLES, info
from moe_inspect.cli.route import ROUTE_EXAMPLES, route

app = typer.Typer(
    name="moe-inspect",
    help="See what the routers of a Mixture-of-Experts model do: per-token routes, expert load, model size.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
    rich_markup_mode="rich",
)


@app.callback()
def _root() -> None:
    """See what the routers of a Mixture-of-Experts model do: per-token routes, expert load, model size."""


app.command(epilog=ROUTE_EXAMPLES)(route)
app.command(epilog=BALANCE_EXAMPLES)(balance)
app.command(epilog=COMPARE_EXAMPLES)(compare)
app.command(epilog=INFO_EXAMPLES)(info)


def main() -> None:
    """Console-script entry point."""
    app()
