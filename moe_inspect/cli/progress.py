"""The progress bar of the long commands (balance, ablate): one look and one behaviour for all of them.

Transient (gone once the run ends), on stderr (stdout stays for results), and off with --quiet and on every
rank but the main one under torchrun, so a data-parallel run draws one bar.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from moe_inspect.cli.common import err

if TYPE_CHECKING:
    from rich.progress import Progress


def progress_bar(label: str, detail: str, *, quiet: bool) -> Progress:
    """``label`` in bold, a bar, the percentage, ``detail`` (a format string over ``task.fields``), time
    elapsed and time left. Use it as a context manager; tasks are added by the caller."""
    from rich.progress import (
        BarColumn,
        Progress,
        TaskProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from moe_inspect.analysis import distributed

    return Progress(
        TextColumn(f"[bold]{label}"),
        BarColumn(),
        TaskProgressColumn(),
        TextColumn(detail),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=True,
        disable=quiet or not distributed.is_main(),
    )
