"""Where the ground truth of a routing decision is read: the experts module that receives it.

Tests compare moe-inspect's capture with what this module received in the same forward, found here by walking
up from the router (independently of the library's own ``routers.moe_block``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


def experts_module(model: nn.Module, router_path: str) -> nn.Module | None:
    """The nearest ``experts`` module above the router at ``router_path`` (``mlp.experts``, DBRX ``ffn.experts``)."""
    parts = router_path.split(".")
    for end in range(len(parts) - 1, 0, -1):
        experts = getattr(model.get_submodule(".".join(parts[:end])), "experts", None)
        if isinstance(experts, nn.Module):
            return experts
    return None


@contextmanager
def experts_received(
    model: nn.Module, routers: Sequence[Any]
) -> Iterator[dict[int, tuple[torch.Tensor, torch.Tensor | None]]]:
    """Per router index, the ``(top_k_index, top_k_weights)`` its experts module received in the forwards run
    inside the block (a later call replaces an earlier one); the hooks are removed on exit, even on errors."""
    received: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
    handles = []

    def hook(index: int) -> Any:
        def pre(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            ids = kwargs.get("top_k_index", args[1] if len(args) > 1 else None)
            weights = kwargs.get("top_k_weights", args[2] if len(args) > 2 else None)
            received[index] = (ids.clone(), None if weights is None else weights.clone())

        return pre

    try:
        for spec in routers:
            owner = experts_module(model, spec.path)
            assert owner is not None, f"no experts module found above {spec.path}"
            handles.append(owner.register_forward_pre_hook(hook(spec.index), with_kwargs=True))
        yield received
    finally:
        for handle in handles:
            handle.remove()
