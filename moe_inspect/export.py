"""Atomic writes: a reader never sees a half-written CSV, JSON or PNG, even after Ctrl-C or a crash."""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import pandas as pd


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; renamed onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _atomic(path: Path, write: Callable[[IO[str]], None]) -> Path:
    with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8", newline="") as handle:
        write(handle)
        handle.flush()
        os.fsync(handle.fileno())
    return Path(path)


def json_ready(data: Any) -> Any:
    """Plain JSON data: DataFrames become lists of records, NaN becomes null (JSON has no NaN)."""
    if isinstance(data, pd.DataFrame):
        return json.loads(data.to_json(orient="records", double_precision=15))
    if isinstance(data, dict):
        return {str(k): json_ready(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [json_ready(v) for v in data]
    if isinstance(data, float) and math.isnan(data):
        return None
    return data


def write_csv(frame: pd.DataFrame, path: str | Path) -> Path:
    """Write ``frame`` as CSV (no index) atomically; floats keep full precision."""
    return _atomic(Path(path), lambda handle: frame.to_csv(handle, index=False))


def write_json(data: Any, path: str | Path) -> Path:
    """Write ``data`` as indented JSON atomically."""
    return _atomic(Path(path), lambda handle: handle.write(json.dumps(data, indent=2, default=str) + "\n"))
