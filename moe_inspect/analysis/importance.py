"""Expert importance: the loss cost of removing each expert alone, and the one-pass proxies people use instead.

The proxies come from the baseline pass through a pre-hook on each chosen layer's experts module, which sees
exactly the ``(hidden, top_k_index, top_k_weights)`` the experts receive: selection frequency, mean combine
weight, and router-weighted expert output norm (mean over routed tokens of weight x ||expert output||, the
saliency of recent expert-pruning work). The per-token expert outputs are recomputed by calling the experts
module once per rank with unit weights, so the figure is the experts' own output whatever their backend.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from moe_inspect.errors import UserError
from moe_inspect.io.schemas import IMPORTANCE
from moe_inspect.model.routers import RouterSpec, moe_block

PROXIES = ("frequency", "mean_weight", "output_norm_saliency")


def experts_module(model: nn.Module, spec: RouterSpec) -> nn.Module:
    """The module the MoE block hands ``(hidden, top_k_index, top_k_weights)`` to."""
    block = moe_block(model, spec)
    experts = getattr(block, "experts", None)
    if not isinstance(experts, nn.Module):
        raise UserError(f"Layer {spec.layer} has no experts module moe-inspect can read expert outputs from.")
    return experts


class ProxyAccumulator:
    """Per-expert count, weight sum and weighted output-norm sum of real tokens, kept on each layer's device.

    A batch's sums count only from ``end_batch`` on (Ctrl-C in a later pass of the batch leaves them out).
    """

    def __init__(self, model: nn.Module, routers: list[RouterSpec]) -> None:
        self.model = model
        self.routers = routers
        self.tokens = 0
        self._sums: dict[int, torch.Tensor] = {}  # router index -> (3, E) float64: count, weight, saliency
        self._pending: dict[int, torch.Tensor] = {}  # the same for the batch in flight
        self._pending_tokens = 0
        self._mask_cpu: torch.Tensor | None = None
        self._masks: dict[torch.device, torch.Tensor] = {}

    def begin_batch(self, attention_mask: torch.Tensor) -> None:
        self._mask_cpu = attention_mask
        self._masks = {}
        self._pending = {}
        self._pending_tokens = int(attention_mask.sum())

    def end_batch(self) -> None:
        """The batch finished: its sums join the totals (out of place, so in or out of inference mode)."""
        for index, part in self._pending.items():
            seen = self._sums.get(index)
            self._sums[index] = part if seen is None else seen + part
        self.tokens += self._pending_tokens
        self._pending, self._pending_tokens = {}, 0

    def _mask_on(self, device: torch.device) -> torch.Tensor:
        if device not in self._masks:
            assert self._mask_cpu is not None, "begin_batch() must be called before the forward"
            self._masks[device] = self._mask_cpu.to(device, non_blocking=True).reshape(-1).double()
        return self._masks[device]

    def _pre_hook(self, spec: RouterSpec) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
            hidden = args[0] if args else kwargs["hidden_states"]
            index = args[1] if len(args) > 1 else next(v for n, v in kwargs.items() if "ind" in n)
            weights = args[2] if len(args) > 2 else next(v for n, v in kwargs.items() if "weight" in n)
            mask = self._mask_on(index.device)
            sums = self._pending.get(spec.index)
            if sums is None:
                sums = self._pending[spec.index] = torch.zeros(
                    3, spec.num_experts, dtype=torch.float64, device=index.device
                )
            unit = torch.ones_like(weights[:, :1])
            for rank in range(index.shape[1]):
                chosen = index[:, rank : rank + 1]
                # .forward skips the hooks (this one included): the expert's own output for each token.
                output = module.forward(hidden, chosen, unit)
                norms = output.float().norm(dim=-1).double()
                w = weights[:, rank].double()
                rows = torch.stack([mask, w * mask, w * norms * mask])
                sums.index_add_(1, chosen[:, 0].long(), rows)

        return hook

    @contextmanager
    def active(self) -> Iterator[ProxyAccumulator]:
        handles = []
        try:
            for spec in self.routers:
                experts = experts_module(self.model, spec)
                handles.append(experts.register_forward_pre_hook(self._pre_hook(spec), with_kwargs=True))
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def frames(self) -> dict[int, pd.DataFrame]:
        """layer -> per-expert proxies (one host copy per layer)."""
        result = {}
        for spec in self.routers:
            sums = self._sums.get(spec.index)
            values = sums.cpu().numpy() if sums is not None else np.zeros((3, spec.num_experts))
            count, weight, saliency = values
            with np.errstate(invalid="ignore", divide="ignore"):
                result[spec.layer] = pd.DataFrame(
                    {
                        "expert": np.arange(spec.num_experts),
                        "frequency": count / max(self.tokens, 1),
                        "mean_weight": np.where(count > 0, weight / np.maximum(count, 1), np.nan),
                        "output_norm_saliency": np.where(count > 0, saliency / np.maximum(count, 1), 0.0),
                    }
                )
        return result


def importance_frame(deltas: dict[tuple[int, int], float], proxies: dict[int, pd.DataFrame]) -> pd.DataFrame:
    """importance.csv: removal deltas ranked per layer (1 = most important), proxies alongside."""
    rows = []
    for layer, frame in sorted(proxies.items()):
        part = frame.copy()
        part.insert(0, "layer", layer)
        part.insert(2, "delta_loss", [deltas[(layer, int(e))] for e in part["expert"]])
        rank = part["delta_loss"].rank(ascending=False, method="first").astype("int64")
        part.insert(3, "rank", rank)
        rows.append(part)
    frame = pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(columns=IMPORTANCE.names)
    return frame[IMPORTANCE.names].astype(IMPORTANCE.dtypes)


def proxy_spearman(importance: pd.DataFrame) -> pd.DataFrame:
    """Per layer, Spearman's rho between each proxy and the true removal delta (1 = the proxy ranks perfectly)."""
    rows = []
    for layer, part in importance.groupby("layer", sort=True):
        row: dict[str, Any] = {"layer": int(layer)}
        for proxy in PROXIES:
            row[proxy] = float(part["delta_loss"].corr(part[proxy], method="spearman"))
        rows.append(row)
    return pd.DataFrame(rows, columns=["layer", *PROXIES])
