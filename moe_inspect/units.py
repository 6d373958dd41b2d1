"""Human-readable sizes, counts and layer lists, shared by every renderer, status line and error sentence."""

from __future__ import annotations

from itertools import groupby


def human_bytes(n: float) -> str:
    """Binary units (GiB), the way memory is reported by torch and nvidia-smi."""
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def human_count(n: float) -> str:
    """Parameter counts the way model cards write them: 46.70 B, 12.9 M."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)}"


def layer_ranges(layers: list[int] | set[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2, 5, 7-8': 61 layer numbers stay one short line."""
    parts: list[str] = []
    ordered = sorted(layers)
    for _, run in groupby(enumerate(ordered), key=lambda pair: pair[1] - pair[0]):
        values = [value for _, value in run]
        parts.append(str(values[0]) if len(values) == 1 else f"{values[0]}-{values[-1]}")
    return ", ".join(parts)
