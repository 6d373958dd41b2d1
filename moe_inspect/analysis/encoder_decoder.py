"""Routing of encoder-decoder MoE models (Switch Transformers, NLLB-MoE): encoder over the source, decoder over
the target prefix, in one forward so expert capacity binds exactly as the model applies it; generation (encoder
once, decoder token by token); the decoder rows of a balance batch; and the capacity rule run.json states.
"""

from __future__ import annotations

from typing import Any

import pandas as pd
import torch

from moe_inspect.analysis.generation import kv_cache, sampling_options
from moe_inspect.analysis.tables import route_frame
from moe_inspect.errors import UserError
from moe_inspect.io import schemas
from moe_inspect.io.corpus import Batch
from moe_inspect.io.tokens import token_bytes
from moe_inspect.model.capture import RouterCapture, capture
from moe_inspect.model.loading import LoadedModel, decoder_start_id
from moe_inspect.model.quantize import no_grad_context


def decoder_ids(loaded: LoadedModel, target: str | None) -> list[int]:
    """The decoder's input: its start token, then the target prefix's tokens (no special tokens: no end mark)."""
    start = decoder_start_id(loaded.model.config)
    if not target:
        return [start]
    return [start, *loaded.tokenizer(target, add_special_tokens=False)["input_ids"]]


def decoder_inputs(loaded: LoadedModel, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """A balance batch's decoder rows and mask (B, T): its aligned targets, else each row's start token alone."""
    if batch.decoder_input_ids is not None and batch.decoder_attention_mask is not None:
        return batch.decoder_input_ids, batch.decoder_attention_mask
    rows = batch.input_ids.shape[0]
    start = torch.full((rows, 1), decoder_start_id(loaded.model.config), dtype=torch.long)
    return start, torch.ones_like(start)


def _source_ids(loaded: LoadedModel, source: str) -> list[int]:
    ids = loaded.tokenizer(source)["input_ids"]
    if not ids:
        raise UserError("The prompt tokenized to zero tokens.")
    return list(ids)


def _frame(
    loaded: LoadedModel, cap: RouterCapture, source_ids: list[int], target_ids: list[int], prefix_len: int
) -> pd.DataFrame:
    """Encoder rows, then decoder rows (``prefix_len`` of them 'prefill', the rest generated, 'decode')."""
    tokenizer = loaded.tokenizer
    parts = []
    for stack, ids in (("encoder", source_ids), ("decoder", target_ids)):
        indices = [spec.index for spec in loaded.routers if spec.stack == stack]
        strings = [tokenizer.decode([i]) for i in ids]
        phases = ["prefill"] * min(prefix_len, len(ids)) + ["decode"] * max(0, len(ids) - prefix_len)
        parts.append(
            route_frame(
                [loaded.routers[i] for i in indices], [cap.calls[i] for i in indices], ids, strings,
                phases=phases if stack == "decoder" else None, token_bytes=token_bytes(tokenizer, ids, strings),
            )
        )
    return pd.concat(parts, ignore_index=True).astype(schemas.ROUTE.dtypes)


def route_encoder_decoder(
    loaded: LoadedModel, source: str, target: str | None = None, seed: int | None = None
) -> pd.DataFrame:
    """Rows of ``schemas.ROUTE`` for both stacks: encoder rows over ``source``, then decoder rows over the start
    token and ``target``; ``layer`` and ``position`` count within each stack.

    ``seed`` seeds torch before the forward, for NLLB-MoE's random second-expert policies.
    """
    source_ids = _source_ids(loaded, source)
    target_ids = decoder_ids(loaded, target)
    device = loaded.input_device
    if seed is not None:
        torch.manual_seed(seed)
    with no_grad_context(loaded.model), capture(loaded.routers) as cap:
        loaded.model(
            input_ids=torch.tensor([source_ids], device=device),
            decoder_input_ids=torch.tensor([target_ids], device=device),
        )
    frame = _frame(loaded, cap, source_ids, target_ids, len(target_ids))
    frame.attrs.update(text=source, target=target or "", prompt_tokens=len(source_ids), generated_text="")
    return frame


def generate_encoder_decoder(
    loaded: LoadedModel,
    source: str,
    target: str | None,
    new_tokens: int,
    temperature: float = 0.0,
    seed: int | None = None,
) -> pd.DataFrame:
    """The encoder once over ``source``, then the decoder from its start token (and ``target``) for ``new_tokens``
    tokens, greedy or sampled at ``temperature``; rows as ``route_encoder_decoder``'s with the generated decoder
    tokens in phase 'decode'.

    ``generate`` runs the head on each step's last position only; the last new token is then fed once more
    through the decoder alone (no head), so every generated token has routing rows. Each decode step routes one
    token, so expert capacity is computed over that step's single token, as the model does when generating.
    """
    model, tokenizer = loaded.model, loaded.tokenizer
    source_ids = _source_ids(loaded, source)
    prefix = decoder_ids(loaded, target)
    device = loaded.input_device
    ids = torch.tensor([source_ids], device=device)
    mask = torch.ones_like(ids)
    if seed is not None:
        torch.manual_seed(seed)
    with no_grad_context(model), capture(loaded.routers) as cap:
        encoded = model.get_encoder()(input_ids=ids, attention_mask=mask)
        out = model.generate(
            encoder_outputs=encoded,
            attention_mask=mask,
            decoder_input_ids=torch.tensor([prefix], device=device),
            decoder_start_token_id=prefix[0],  # else generate prepends its generation config's start token
            max_new_tokens=new_tokens,
            **sampling_options(temperature, tokenizer.pad_token_id),
        )
        sequence = out.sequences
        if sequence.shape[1] > len(prefix):
            cache = kv_cache(out)
            model.get_decoder()(
                input_ids=sequence[:, -1:], encoder_hidden_states=encoded[0], encoder_attention_mask=mask,
                use_cache=True, **cache,
            )
    target_ids = sequence[0].tolist()
    frame = _frame(loaded, cap, source_ids, target_ids, len(prefix))
    frame.attrs.update(
        text=source, target=target or "", prompt_tokens=len(source_ids),
        generated_text=tokenizer.decode(target_ids[len(prefix):]),
    )
    return frame


def capacity_rule(loaded: LoadedModel, batch_size: int, seed: int | None) -> dict[str, Any] | None:
    """How the model's routers apply expert capacity, for run.json (None for routers that apply none).

    The measured ``drop_rate`` depends on it: on the batch size and, through padding, on the batch's longest row.
    """
    config = loaded.model.config
    model_type = loaded.model_type
    padding_side = getattr(loaded.tokenizer, "padding_side", "right")
    common = {"batch_size": batch_size, "padding_side": padding_side, "seed": seed}
    if model_type == "switch_transformers":
        return {
            "rule": f"expert_capacity = {getattr(config, 'expert_capacity', None)} tokens per expert per sequence row",
            "expert_capacity": getattr(config, "expert_capacity", None),
            "order": "tokens claim an expert's slots in position order within their row",
            "padding": "the router has no padding mask, so pads take slots too; with right padding they come after "
            "every real token of their row and displace none, with left padding they would",
            **common,
        }
    if model_type == "nllb-moe":
        fraction = getattr(config, "moe_eval_capacity_token_fraction", 0) or 0
        return {
            "rule": (
                f"ceil({fraction:g} x the batch's tokens) per expert over the whole batch (rows x padded length)"
                if fraction > 0 else f"expert_capacity = {getattr(config, 'expert_capacity', None)} per expert "
                "over the whole batch"
            ),
            "capacity_token_fraction": fraction,
            "order": (
                "tokens by their top routing probability (batch_prioritized_routing)"
                if getattr(config, "batch_prioritized_routing", False)
                else "first choices in token order, then second choices"
            ),
            "padding": (
                "router_ignore_padding_tokens is set, so pads are routed and take slots like real tokens"
                if getattr(config, "router_ignore_padding_tokens", False)
                else "the router masks pads out (it gets the attention mask), so they take no slot, but they count "
                "in the batch's tokens and so enlarge the capacity"
            ),
            "second_expert_policy": next(
                (getattr(s.module, "second_expert_policy", None) for s in loaded.routers if s.module is not None),
                getattr(config, "second_expert_policy", "all"),
            ),
            **common,
        }
    return None
