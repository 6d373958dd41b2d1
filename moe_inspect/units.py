"""Human-readable sizes and counts, shared by every renderer and status line."""

from __future__ import annotations


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
