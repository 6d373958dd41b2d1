"""What every command does around the library: load with one status line, turn user errors into exit 2."""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from moe_inspect.api import Inspector, load
from moe_inspect.errors import UserError
from moe_inspect.model.quantize import QuantOptions
from moe_inspect.units import human_bytes

out = Console(highlight=False)
err = Console(stderr=True, highlight=False)

F = TypeVar("F", bound=Callable[..., Any])


def user_errors(func: F) -> F:
    """One sentence on stderr and exit code 2 for errors the user caused; bugs still raise."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except UserError as exc:
            err.print(f"[red]Error:[/red] {escape(str(exc))}", soft_wrap=True)  # '[quant]' is not markup
            raise typer.Exit(exc.exit_code) from None

    return wrapper  # type: ignore[return-value]


def load_for_cli(
    model: str | None,
    dtype: str = "auto",
    device: str = "auto",
    revision: str | None = None,
    trust_remote_code: bool = False,
    device_map: str | None = None,
    load_in_4bit: bool = False,
    load_in_8bit: bool = False,
    tokenizer: Any = None,
    quant: QuantOptions | None = None,
) -> Inspector:
    """Load and say in one line what was loaded (and that it is the demo model, when it is)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the one status line below says what was loaded
    # bitsandbytes logs on every int8 matmul that fp32 inputs are cast, and on CPU that an optional
    # kernel package is missing; the status line below says what matters.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    # torchao, when installed, is imported by transformers' loader and logs its missing GPU kernels; transformers'
    # quantizers warn that a pre-quantized checkpoint is dequantized, which the status line says too.
    for name in ("torchao", "torch.utils._pytree", "transformers.quantizers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        with err.status("Loading model…"):
            insp = load(
                model,
                tokenizer=tokenizer,
                dtype=dtype,
                device=device,
                revision=revision,
                trust_remote_code=trust_remote_code,
                device_map=device_map,
                load_in_4bit=load_in_4bit,
                load_in_8bit=load_in_8bit,
                quant=quant,
            )
    for warning in caught:
        if "heuristic" in str(warning.message):
            err.print(f"[yellow]Warning:[/yellow] {warning.message}", soft_wrap=True)
    loaded = insp.loaded
    if loaded.is_default:
        err.print(
            "Using the small demo model shipped with moe-inspect; pass --model for a real checkpoint.",
            soft_wrap=True,
        )
    routers = loaded.routers
    experts = sorted({r.num_experts for r in routers})
    ks = sorted({r.top_k for r in routers})
    err.print(
        f"[dim]{loaded.model_type}: {len(routers)} routers, {'/'.join(map(str, experts))} experts, "
        f"top-{'/'.join(map(str, ks))}; {loaded.dtype} on {loaded.device}; "
        f"{human_bytes(loaded.footprint_bytes())} in memory[/dim]",
        soft_wrap=True,
    )
    for note in loaded.notes:
        err.print(note, soft_wrap=True)
    return insp
