"""What every command does around the library: one output layer, one way to load, user errors as exit 2.

Output rules: results (tables, or one JSON document with --json) go to stdout; status lines, progress and
errors go to stderr; --quiet silences everything but errors, --json output and the files asked for.
The library is imported inside functions, so `--help` never pays for torch.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import traceback
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import typer
from rich.console import Console
from rich.text import Text

from moe_inspect.errors import UserError
from moe_inspect.model.options import LoadOptions

if TYPE_CHECKING:
    from moe_inspect.api import Inspector

out = Console(highlight=False)
err = Console(stderr=True, highlight=False)

DEBUG_ENV = "MOE_INSPECT_DEBUG"

F = TypeVar("F", bound=Callable[..., Any])


def debug() -> bool:
    """MOE_INSPECT_DEBUG=1: user errors show their traceback too (for bug reports)."""
    return os.environ.get(DEBUG_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


def exit_cleanly_on_sigterm() -> None:
    """SIGTERM becomes SystemExit(143), so cleanup code runs: no temporary file or staging folder is left."""

    def terminate(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminate)


def mute_library_loggers() -> None:
    """torchao, when installed, is imported by transformers (its loader, and its processors too) and logs its
    missing GPU kernels, and torch's pytree warns about torchao's enums; transformers' quantizers warn that a
    pre-quantized checkpoint is dequantized, which the status line says too. Naming a logger imports nothing."""
    for name in ("torchao", "torch.utils._pytree", "transformers.quantizers"):
        logging.getLogger(name).setLevel(logging.ERROR)


def user_errors(func: F) -> F:
    """One sentence on stderr and exit code 2 for errors the user caused; bugs still raise; a closed pipe is
    a quiet success."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        mute_library_loggers()  # before anything imports transformers (processors, configs, weights)
        try:
            return func(*args, **kwargs)
        except BrokenPipeError:
            # `| head` closed the pipe: stop quietly with success, as Unix tools do, and keep the interpreter's
            # final flush from complaining about the closed stdout.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise typer.Exit(0) from None
        except UserError as exc:
            if debug():
                traceback.print_exc()
            err.print(Text("Error: ", style="red") + Text(exc.for_cli()), soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None

    return wrapper  # type: ignore[return-value]


class Output:
    """Where a command's words go, honouring --quiet and --json."""

    def __init__(self, quiet: bool = False, json_output: bool = False) -> None:
        self.quiet = quiet
        self.json_output = json_output

    def status(self, message: str) -> None:
        """A status line on stderr (never stdout, which carries results)."""
        if not self.quiet:
            err.print(message, soft_wrap=True)

    def spinner(self, message: str) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext() if self.quiet else err.status(message)

    @property
    def tables(self) -> bool:
        """Whether terminal tables are wanted (not with --quiet or --json)."""
        return not (self.quiet or self.json_output)

    def json(self, data: Any) -> None:
        """The one JSON document of a --json run, on stdout."""
        from moe_inspect.io.export import json_ready

        print(json.dumps(json_ready(data), indent=2, allow_nan=False))


@contextlib.contextmanager
def _quiet_libraries() -> Iterator[list[warnings.WarningMessage]]:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the one status line below says what was loaded
    # bitsandbytes logs on every int8 matmul that fp32 inputs are cast, and on CPU that an optional
    # kernel package is missing; the status line below says what matters.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    mute_library_loggers()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        yield caught


def save(write: Callable[[Path], Any], target: Path, label: str, output: Output) -> str | None:
    """Write with ``write(target)``; when that fails (disk full), write to a temporary folder instead.

    Returns None on success, else the one sentence saying what failed and where the results went.
    """
    try:
        write(target)
        output.status(f"Wrote {target}")
        return None
    except OSError as exc:
        reason = exc.strerror or str(exc)
    fallback_dir = Path(tempfile.mkdtemp(prefix="moe-inspect-"))
    fallback = fallback_dir / (target.name or "output")
    try:
        write(fallback)
    except OSError:
        shutil.rmtree(fallback_dir, ignore_errors=True)
        return f"Could not write {label} {target} ({reason}), nor a copy in {fallback_dir.parent}."
    return f"Could not write {label} {target} ({reason}); the results were saved to {fallback} instead."


def load_for_cli(options: LoadOptions, output: Output | None = None, tokenizer: Any = None) -> Inspector:
    """Load and say in one line what was loaded (and that it is the demo model, when it is)."""
    from moe_inspect.api import load
    from moe_inspect.units import human_bytes

    output = output or Output()
    with _quiet_libraries() as caught, output.spinner("Loading model…"):
        insp = load(options, tokenizer=tokenizer)
    for warning in caught:
        if "heuristic" in str(warning.message):
            err.print(f"[yellow]Warning:[/yellow] {warning.message}", soft_wrap=True)
    loaded = insp.loaded
    if loaded.is_default:
        output.status("Using the small demo model shipped with moe-inspect; pass --model for a real checkpoint.")
    routers = loaded.routers
    experts = sorted({r.num_experts for r in routers})
    ks = sorted({r.top_k for r in routers})
    output.status(
        f"[dim]{loaded.model_type}: {len(routers)} routers, {'/'.join(map(str, experts))} experts, "
        f"top-{'/'.join(map(str, ks))}; {loaded.dtype} on {loaded.device}; "
        f"{human_bytes(loaded.footprint_bytes())} in memory[/dim]"
    )
    for note in loaded.notes:
        output.status(note)
    return insp
