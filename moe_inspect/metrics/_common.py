"""Types and host/device helpers shared by every metric family (no formulas here)."""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

ArrayLike = torch.Tensor | np.ndarray | list[float] | list[int]
Number = int | float | torch.Tensor
# How a family scores experts; the one definition (families.py and routers.py import it). "product_key" (Doge)
# scores half-keys, not experts, so ``routing_distribution`` does not take it (capture has its own rule).
Scoring = Literal["softmax", "sigmoid", "sqrtsoftplus", "probabilities", "product_key"]
SCORINGS: tuple[str, ...] = ("softmax", "sigmoid", "sqrtsoftplus", "probabilities")

_TINY32 = torch.finfo(torch.float32).tiny


# ----------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------


def _host64(x: ArrayLike) -> torch.Tensor:
    """A 1-D float64 CPU copy (one small device-to-host copy; end-of-run functions only)."""
    if isinstance(x, np.ndarray):  # pandas hands out read-only views; torch warns on those
        return torch.from_numpy(np.array(x, dtype=np.float64).reshape(-1))
    return torch.as_tensor(x).detach().to(device="cpu", dtype=torch.float64).reshape(-1)


def _scalar(x: Number) -> float:
    return float(x.item()) if isinstance(x, torch.Tensor) else float(x)


def _float_on_device(x: ArrayLike) -> torch.Tensor:
    """float64 where the device supports it (not MPS), on the input's device."""
    t = torch.from_numpy(np.array(x)) if isinstance(x, np.ndarray) else torch.as_tensor(x).detach()
    return t.to(torch.float32 if t.device.type == "mps" else torch.float64)


def _counts_into(ids: torch.Tensor, num_bins: int) -> torch.Tensor:
    """Histogram of ``ids`` into ``num_bins`` int64 bins, ignoring ids outside ``[0, num_bins)``.

    ``torch.bincount`` reads the maximum back to the host to size its output; ``scatter_add_`` into a fixed
    buffer with an overflow bin does not (the same trick vLLM/SGLang use for their expert histograms).
    """
    flat = ids.reshape(-1).long()
    valid = (flat >= 0) & (flat < num_bins)
    key = torch.where(valid, flat, num_bins)
    out = torch.zeros(num_bins + 1, dtype=torch.int64, device=ids.device)
    out.scatter_add_(0, key, torch.ones_like(key))
    return out[:num_bins]


def _check_experts_2d(experts: torch.Tensor, name: str = "experts") -> torch.Tensor:
    if experts.dim() == 1:
        experts = experts.unsqueeze(-1)
    if experts.dim() != 2:
        raise ValueError(f"{name} must have shape [T, k], got {tuple(experts.shape)}")
    return experts
