"""Atomic writes: a reader never sees a half-written CSV or JSON, even after Ctrl-C or a crash."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import pandas as pd


def _atomic(path: Path, write: Callable[[IO[str]], None]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_csv(frame: pd.DataFrame, path: str | Path) -> Path:
    """Write ``frame`` as CSV (no index) atomically; floats keep full precision."""
    return _atomic(Path(path), lambda handle: frame.to_csv(handle, index=False))


def write_json(data: Any, path: str | Path, indent: int | None = 2) -> Path:
    """Write ``data`` as JSON (indented unless ``indent`` is None) atomically."""
    return _atomic(Path(path), lambda handle: handle.write(json.dumps(data, indent=indent, default=str) + "\n"))


def write_torch(data: Any, path: str | Path) -> Path:
    """``torch.save(data)`` atomically."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(data, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
