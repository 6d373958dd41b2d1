"""Routing of encoder-decoder MoE models (Switch Transformers, NLLB-MoE): encoder over the source, decoder over
the target prefix, in one forward so expert capacity binds exactly as the model applies it.
"""

from __future__ import annotations

import pandas as pd
import torch

from moe_inspect.analysis.tables import route_frame
from moe_inspect.errors import UserError
from moe_inspect.io import schemas
from moe_inspect.io.tokens import token_bytes
from moe_inspect.model.capture import capture
from moe_inspect.model.loading import LoadedModel, decoder_start_id


def decoder_ids(loaded: LoadedModel, target: str | None) -> list[int]:
    """The decoder's input: its start token, then the target prefix's tokens (no special tokens: no end mark)."""
    start = decoder_start_id(loaded.model.config)
    if not target:
        return [start]
    return [start, *loaded.tokenizer(target, add_special_tokens=False)["input_ids"]]


def route_encoder_decoder(
    loaded: LoadedModel, source: str, target: str | None = None, seed: int | None = None
) -> pd.DataFrame:
    """Rows of ``schemas.ROUTE`` for both stacks: encoder rows over ``source``, then decoder rows over the start
    token and ``target``; ``layer`` and ``position`` count within each stack.

    ``seed`` seeds torch before the forward, for NLLB-MoE's random second-expert policies.
    """
    tokenizer = loaded.tokenizer
    source_ids = tokenizer(source)["input_ids"]
    if not source_ids:
        raise UserError("The prompt tokenized to zero tokens.")
    target_ids = decoder_ids(loaded, target)
    device = loaded.input_device
    if seed is not None:
        torch.manual_seed(seed)
    with torch.inference_mode(), capture(loaded.routers) as cap:
        loaded.model(
            input_ids=torch.tensor([source_ids], device=device),
            decoder_input_ids=torch.tensor([target_ids], device=device),
        )
    parts = []
    for stack, ids in (("encoder", source_ids), ("decoder", target_ids)):
        indices = [spec.index for spec in loaded.routers if spec.stack == stack]
        strings = [tokenizer.decode([i]) for i in ids]
        parts.append(
            route_frame(
                [loaded.routers[i] for i in indices], [cap.calls[i] for i in indices], ids, strings,
                token_bytes=token_bytes(tokenizer, ids, strings),
            )
        )
    frame = pd.concat(parts, ignore_index=True).astype(schemas.ROUTE.dtypes)
    frame.attrs.update(text=source, target=target or "", prompt_tokens=len(source_ids), generated_text="")
    return frame
