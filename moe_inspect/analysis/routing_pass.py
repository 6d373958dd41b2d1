"""A forward pass for routing statistics: every router fires, no logits, nothing runs after the last router.

``balance`` and ``route`` read the routers, never the next-token distribution, yet a causal LM's forward ends
with its head (vocab x hidden, up to a sixth of the active compute of the common MoE models, and [B, S, V]
float32 logits in memory) and, in families whose last layers are dense, with those layers too. So:

* the decoder is called without its head (the model's own decoder module, the one ``OutputHead`` replays);
* the forward stops by a private exception raised from a hook as soon as the last router call of the forward
  has been read (after capture's hooks, which were installed first and so run first). How many router calls
  a forward makes is learnt from the first full pass per model, so a router that fires twice or never is
  still handled exactly. Even the last MoE layer's experts are skipped: its routing is already decided.

Captured routing is bitwise equal to a full forward's for every family (tests/test_routing_pass.py).
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from moe_inspect.analysis.outputs import decoder_of
from moe_inspect.model.routers import RouterSpec

if TYPE_CHECKING:
    from moe_inspect.model.loading import LoadedModel

# model -> {router paths: router calls one forward makes}, learnt from each model's first full routing pass
_CALLS_PER_FORWARD: weakref.WeakKeyDictionary[nn.Module, dict[tuple[str, ...], int]] = weakref.WeakKeyDictionary()


class _RoutingDone(Exception):
    """Raised from a hook once every router call of the forward has been read; caught by routing_forward."""


def _emit_points(spec: RouterSpec) -> tuple[nn.Module, bool]:
    """Where a router's decision is complete: DBRX's experts module's input (pre-hook), else the router's output."""
    if spec.selection_module is not None:
        return spec.selection_module, True
    return spec.module, False


def _can_stop_early(model: nn.Module) -> bool:
    """Not under accelerate offloading: an interrupted forward would leave an offloaded layer's weights loaded."""
    placement = getattr(model, "hf_device_map", None) or {}
    places = {str(p) for p in placement.values()}
    return "disk" not in places and not ("cpu" in places and len(places) > 1)


def _encoder_decoder(model: nn.Module, input_ids: torch.Tensor, kwargs: dict[str, Any]) -> None:
    """The seq2seq model's own forward up to its decoder's output: encoder, then decoder over it, no LM head."""
    kwargs = dict(kwargs)
    mask = kwargs.get("attention_mask")
    decoder_ids = kwargs.pop("decoder_input_ids")
    decoder_mask = kwargs.pop("decoder_attention_mask", None)
    encoded = model.get_encoder()(input_ids=input_ids, attention_mask=mask)
    model.get_decoder()(
        input_ids=decoder_ids,
        attention_mask=decoder_mask,
        encoder_hidden_states=encoded[0],
        encoder_attention_mask=mask,
        use_cache=kwargs.get("use_cache", False),
    )


def _forward(model: nn.Module, input_ids: torch.Tensor, kwargs: dict[str, Any]) -> None:
    if "decoder_input_ids" in kwargs:
        _encoder_decoder(model, input_ids, kwargs)
        return
    found = decoder_of(model)
    if found is not None:
        found[1](input_ids=input_ids, **kwargs)
        return
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        kwargs = {**kwargs, "logits_to_keep": torch.empty(0, dtype=torch.long, device=input_ids.device)}
    model(input_ids=input_ids, **kwargs)


def routing_forward(
    loaded: LoadedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    **model_kwargs: Any,
) -> None:
    """Run ``loaded``'s model so that every router fires once more, with no head and no layer after the last router.

    Call it inside ``capture(...)``: the routers' outputs go to the capture, this returns nothing. Extra keyword
    arguments (``past_key_values``, ``use_cache``) go to the decoder; ``use_cache`` defaults to False. With
    ``decoder_input_ids`` (and ``decoder_attention_mask``) an encoder-decoder runs its encoder over ``input_ids``
    and its decoder over those, still without the head.
    """
    model = loaded.model
    key = tuple(spec.path for spec in loaded.routers)
    known = _CALLS_PER_FORWARD.setdefault(model, {})
    expected = known.get(key) if _can_stop_early(model) else None
    seen = 0

    def count(*_args: Any) -> None:
        nonlocal seen
        seen += 1
        if expected is not None and seen == expected:
            raise _RoutingDone

    handles: list[torch.utils.hooks.RemovableHandle] = []
    kwargs: dict[str, Any] = {"use_cache": False, **model_kwargs}
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask
    if position_ids is not None:
        kwargs["position_ids"] = position_ids
    try:
        for spec in loaded.routers:
            module, before = _emit_points(spec)
            hook: Callable[..., Any] = count
            handles.append(module.register_forward_pre_hook(hook) if before else module.register_forward_hook(hook))
        _forward(model, input_ids, kwargs)
        if seen:  # a full pass: remember how many router calls it made
            known[key] = seen
    except _RoutingDone:
        pass
    finally:
        for handle in handles:
            handle.remove()
