"""Output files: checked before any work starts, then written atomically.

A reader never sees a half-written CSV, JSON or PNG, even after Ctrl-C or a crash; and a path that cannot
be written is refused before a model loads, not after an hour of routing.
"""

from __future__ import annotations

import ctypes
import errno
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import pandas as pd

from moe_inspect.errors import UserError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; renamed onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; honour the umask like any other tool (0644)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def check_output(path: str | Path, label: str, folder: bool = False) -> Path:
    """Refuse, in one sentence, an output path that cannot be written; creates nothing.

    Proves that a file can be created and renamed in the nearest existing folder on the way (what the atomic
    writes below will do), and refuses a folder where a file is meant and the other way round.
    """
    path = Path(path).expanduser()
    if path.exists() and path.is_dir() != folder:
        kind = "is a folder; name a file" if path.is_dir() else "is a file, not a folder"
        raise UserError(f"{label} {path} {kind}.")
    existing = _nearest_existing(path.parent)  # a folder output is written beside itself, then swapped in
    if not existing.is_dir():
        raise UserError(f"{label} {path} cannot be created: {existing} is a file, not a folder.")
    try:
        fd, probe = tempfile.mkstemp(prefix=".moe-inspect-probe-", dir=existing)
        os.close(fd)
        os.replace(probe, probe + ".renamed")
        os.unlink(probe + ".renamed")
    except OSError as exc:
        raise UserError(f"{label} {path} cannot be written: {existing}: {exc.strerror or exc}.") from None
    return path


def _atomic(path: Path, write: Callable[[IO[str]], None]) -> Path:
    with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8", newline="") as handle:
        write(handle)
        handle.flush()
        os.fsync(handle.fileno())
    return Path(path)


def _exchange(a: Path, b: Path) -> None:
    """Swap two folders at once (Linux renameat2 RENAME_EXCHANGE); elsewhere by three renames."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        renameat2 = None
    if renameat2 is not None:
        at_fdcwd, rename_exchange = -100, 2
        if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
            return
        code = ctypes.get_errno()
        if code not in (errno.ENOSYS, errno.EINVAL):
            raise OSError(code, os.strerror(code), str(b))
    parked = a.with_name(a.name + ".old")
    os.rename(b, parked)
    os.rename(a, b)
    os.rename(parked, a)


def replace_folder(
    target: str | Path, write: Callable[[Path], list[Path]], replaces: tuple[str, ...] = ()
) -> list[Path]:
    """Write a set of files as one unit: into a folder beside ``target``, then swapped in at once.

    A reader of ``target`` sees the whole set of the previous run or of this one, never a mix of two runs
    writing at the same time. Other files already in ``target`` (a plot, notes) are carried over, except
    ``replaces``: names that belong to the set even when this run did not write them.
    """
    target = Path(target)
    if target.is_symlink():  # swap the folder it points to, keep the user's link
        target = target.resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        os.chmod(staging, 0o777 & ~_umask())  # mkdtemp makes 0700; the folder is meant to be shared like any
        names = {p.name for p in write(staging)}
        if not target.is_dir():
            try:
                os.rename(staging, target)
                return [target / name for name in sorted(names)]
            except OSError as exc:  # another run created it meanwhile: swap with that one
                if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
        for other in target.iterdir():
            if other.name in names or other.name in replaces:
                continue
            if other.is_dir() and not other.is_symlink():
                shutil.copytree(other, staging / other.name, copy_function=os.link)
            else:
                os.link(other, staging / other.name, follow_symlinks=False)
        _exchange(staging, target)
        shutil.rmtree(staging)  # now the previous run's folder
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return [target / name for name in sorted(names)]


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


def write_json(data: Any, path: str | Path, indent: int | None = 2) -> Path:
    """Write ``data`` as JSON (indented unless ``indent`` is None) atomically."""
    return _atomic(Path(path), lambda handle: handle.write(json.dumps(data, indent=indent, default=str) + "\n"))


def write_torch(data: Any, path: str | Path) -> Path:
    """``torch.save(data)`` atomically."""
    import torch

    with atomic_path(path) as tmp:
        torch.save(data, tmp)
    return Path(path)


def write_text(text: str, path: str | Path) -> Path:
    """Write ``text`` (UTF-8) atomically, honouring the umask: HTML reports."""
    return _atomic(Path(path), lambda handle: handle.write(text))
