"""Per-expert gradient norms of the language-model loss, with gradients kept only for the routed experts.

transformers 5 stores a layer's routed experts as fused parameters whose first dimension is the expert
(``gate_up_proj [E, ...]``, ``down_proj [E, ...]``, GPT-OSS biases ``[E, ...]``), so expert e's gradient is
slice e of each. Every other parameter has ``requires_grad`` switched off for the pass (no gradient buffers,
no optimizer state), the norms are reduced on the device as each gradient arrives (a post-accumulate hook), which
then frees it: memory is one fused expert parameter's gradient at a time plus the activations autograd keeps for
one batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from moe_inspect.analysis.importance import experts_module
from moe_inspect.errors import UserError
from moe_inspect.io.schemas import GRADIENTS
from moe_inspect.model.capture import RouterOutput, capture
from moe_inspect.model.routers import RouterSpec


def expert_parameters(model: nn.Module, spec: RouterSpec) -> list[nn.Parameter]:
    """The layer's fused expert parameters (first dimension = routed experts)."""
    experts = experts_module(model, spec)
    params = [p for p in experts.parameters() if p.dim() >= 1 and p.shape[0] == spec.num_experts]
    if not params:
        raise UserError(f"Layer {spec.layer} stores no per-expert weights moe-inspect can take gradients of.")
    return params


@contextmanager
def grads_only_for(model: nn.Module, params: list[nn.Parameter]) -> Iterator[None]:
    """``requires_grad`` on ``params`` only, for the block; every flag and ``.grad`` restored afterwards."""
    saved = [(p, p.requires_grad, p.grad) for p in model.parameters()]
    chosen = {id(p) for p in params}
    try:
        for p, _, _ in saved:
            p.requires_grad_(id(p) in chosen)
            p.grad = None
        yield
    finally:
        for p, flag, grad in saved:
            p.grad = grad
            p.requires_grad_(flag)


class GradientAccumulator:
    """Token-weighted sums of per-batch, per-expert gradient norms, and routed-token counts, on the device.

    Each expert parameter's gradient is reduced to per-expert squared norms by a post-accumulate hook the moment
    backward produces it, then freed, so at most one parameter's gradient exists at a time.
    """

    def __init__(self, model: nn.Module, routers: list[RouterSpec]) -> None:
        self.model = model
        self.routers = routers
        self.params = {spec.index: expert_parameters(model, spec) for spec in routers}
        self.tokens = 0
        self._norm_sums: dict[int, torch.Tensor] = {}
        self._squares: dict[int, torch.Tensor] = {}  # this batch's per-expert squared norms
        self._batch_counts: dict[int, torch.Tensor] = {}  # this batch's routed tokens, until add_batch
        self._counts: dict[int, torch.Tensor] = {}
        self._mask: torch.Tensor | None = None

    def all_parameters(self) -> list[nn.Parameter]:
        return [p for params in self.params.values() for p in params]

    def _count(self, spec: RouterSpec, out: RouterOutput) -> None:
        assert self._mask is not None
        mask = self._mask.to(out.experts.device).reshape(-1, 1).long()
        counts = torch.zeros(spec.num_experts, dtype=torch.int64, device=out.experts.device)
        valid = (out.experts < spec.num_experts).long() * mask
        counts.index_add_(0, out.experts.clamp(max=spec.num_experts - 1).reshape(-1), valid.reshape(-1))
        self._batch_counts[spec.index] = self._batch_counts.get(spec.index, 0) + counts

    def _reduce(self, spec: RouterSpec) -> Any:
        def hook(param: nn.Parameter) -> None:
            if param.grad is None:
                return
            # One expert's slice at a time in float32, never a float32 copy of the whole fused gradient.
            grad = param.grad
            part = torch.stack(
                [torch.linalg.vector_norm(grad[e], dtype=torch.float32) for e in range(spec.num_experts)]
            ).pow(2)
            self._squares[spec.index] = self._squares.get(spec.index, 0) + part
            param.grad = None

        return hook

    @contextmanager
    def active(self, attention_mask: torch.Tensor) -> Iterator[None]:
        """Gradients for expert weights only, reduced as they arrive; routed-token counts for this batch.

        Nothing of the batch counts before ``add_batch``: an interrupted pass leaves the figures as they were.
        """
        self._mask = attention_mask
        self._squares, self._batch_counts = {}, {}
        handles = []
        with grads_only_for(self.model, self.all_parameters()), torch.enable_grad():
            try:
                for spec in self.routers:
                    for param in self.params[spec.index]:
                        handles.append(param.register_post_accumulate_grad_hook(self._reduce(spec)))
                with capture(self.routers, sink=self._count, keep=False):
                    yield
            finally:
                for handle in handles:
                    handle.remove()

    def add_batch(self, predicted: int) -> None:
        """After ``backward`` of the batch's mean loss: weight each expert's gradient norm by the batch's tokens."""
        self.tokens += predicted
        for index, squares in self._squares.items():
            self._norm_sums[index] = self._norm_sums.get(index, 0) + squares.sqrt().double() * predicted
        for index, counts in self._batch_counts.items():
            self._counts[index] = self._counts.get(index, 0) + counts
        self._squares, self._batch_counts = {}, {}

    def frame(self) -> pd.DataFrame:
        rows = []
        for spec in self.routers:
            norms = self._norm_sums.get(spec.index)
            counts = self._counts.get(spec.index)
            e = spec.num_experts
            rows.append(
                pd.DataFrame(
                    {
                        "layer": spec.layer,
                        "expert": np.arange(e),
                        "grad_norm": norms.cpu().numpy() / max(self.tokens, 1) if norms is not None else np.zeros(e),
                        "tokens": counts.cpu().numpy() if isinstance(counts, torch.Tensor) else np.zeros(e, int),
                    }
                )
            )
        frame = pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(columns=GRADIENTS.names)
        return frame[GRADIENTS.names].astype(GRADIENTS.dtypes)
