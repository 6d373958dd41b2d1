"""Every family ``ablate`` can re-route: with its own k and nothing removed, the re-implemented selection equals
the router's output bit for bit (the registry's ``reselect`` facts are checked, not trusted)."""

from __future__ import annotations

import pytest
import torch
from tiny_models import build_tiny_model

from moe_inspect.analysis.interventions import reselect, supported_families
from moe_inspect.model.routers import find_routers


@pytest.mark.parametrize("model_type", supported_families())
def test_reselection_reproduces_the_router(model_type: str) -> None:
    model = build_tiny_model(model_type).eval()
    routers = find_routers(model)
    checked: list[int] = []

    def make_hook(spec):
        def hook(module, _args, out):
            weights, index = reselect(spec, module, out[0], spec.top_k, None)
            assert torch.equal(index.to(out[2].dtype), out[2]), spec.path
            assert torch.equal(weights.to(out[1].dtype), out[1]), spec.path
            checked.append(spec.index)

        return hook

    handles = [spec.module.register_forward_hook(make_hook(spec)) for spec in routers]
    try:
        with torch.inference_mode():
            model(input_ids=torch.randint(3, 300, (2, 9), generator=torch.Generator().manual_seed(0)))
    finally:
        for handle in handles:
            handle.remove()
    assert sorted(checked) == [spec.index for spec in routers]
