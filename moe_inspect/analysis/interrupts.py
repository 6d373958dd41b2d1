"""Ctrl-C held back for a few statements, so that a batch's commit into several sums happens whole or not at all."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


@contextmanager
def interrupts_deferred() -> Iterator[None]:
    """SIGINT received inside the block is delivered (to the handler that was in place) when the block ends.

    Only the main thread can set signal handlers; elsewhere (where SIGINT is never delivered anyway), or where
    the handler in place was not set from Python and could not be put back, the block just runs. Meant for
    short, non-blocking blocks: a batch's in-place adds, never a forward pass.
    """
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) is None:
        yield
        return
    received: list[int] = []

    def hold(signum: int, _frame: Any) -> None:
        received.append(signum)

    previous = signal.signal(signal.SIGINT, hold)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if received:
            signal.raise_signal(signal.SIGINT)
