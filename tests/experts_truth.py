"""Where the ground truth of a routing decision is read: the experts module that receives it.

Tests compare moe-inspect's capture with what this module received in the same forward, found here by walking
up from the router (independently of the library's own ``routers.moe_block``).
"""

from __future__ import annotations

from torch import nn


def experts_module(model: nn.Module, router_path: str) -> nn.Module | None:
    """The nearest ``experts`` module above the router at ``router_path`` (``mlp.experts``, DBRX ``ffn.experts``)."""
    parts = router_path.split(".")
    for end in range(len(parts) - 1, 0, -1):
        experts = getattr(model.get_submodule(".".join(parts[:end])), "experts", None)
        if isinstance(experts, nn.Module):
            return experts
    return None
