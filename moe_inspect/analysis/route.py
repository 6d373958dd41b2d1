"""``route`` on a decoder-only or vision-language model: one prompt (with its images), optionally generated
on, with every router's decision for every token as rows of ``schemas.ROUTE``.

Encoder-decoders have their own pass (``encoder_decoder``): two stacks, a decoder prefix, capacity drops.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from moe_inspect.analysis.generation import kv_cache, sampling_options
from moe_inspect.analysis.modality import check_image_run, modality_codes, modality_names, processor_inputs
from moe_inspect.analysis.routing_pass import routing_forward
from moe_inspect.analysis.tables import route_frame
from moe_inspect.errors import UserError
from moe_inspect.io.tokens import token_bytes
from moe_inspect.model.capture import capture
from moe_inspect.model.loading import LoadedModel
from moe_inspect.model.quantize import no_grad_context
from moe_inspect.model.source import IMAGE_TEXT, check_prompt_length, positions_limit


def route_prompt(
    loaded: LoadedModel,
    text: str,
    generate: int = 0,
    temperature: float = 0.0,
    seed: int | None = None,
    processor: Any = None,
    images: Sequence[str | Path | Any] | None = None,
) -> pd.DataFrame:
    """Rows for ``text`` (and ``images`` through ``processor``) and ``generate`` new tokens; ``frame.attrs`` holds
    ``text``, ``generated_text`` and ``prompt_tokens``.

    Without images the decoder runs with no head; with images the whole model runs (vision tower, then language
    model, no head) and the image tokens' rows are marked ``modality`` = ``image``.
    """
    tokenizer, model, device = loaded.tokenizer, loaded.model, loaded.input_device
    extra: dict[str, Any] = {}
    if images:
        check_image_run(generate=generate)
        extra = processor_inputs(processor, [text], [list(images)])
        encoded = {"input_ids": extra.pop("input_ids")}
        extra.pop("attention_mask", None)  # one unpadded sequence; multimodal RoPE then needs no mask
        extra = {name: value.to(device) for name, value in extra.items()}
    else:
        encoded = tokenizer(text, return_tensors="pt")
    input_ids = encoded["input_ids"].to(device)
    if input_ids.shape[1] == 0:
        raise UserError("The prompt tokenized to zero tokens.")
    prompt_len = int(input_ids.shape[1])
    check_prompt_length(prompt_len, generate, positions_limit(model.config))
    with no_grad_context(model), capture(loaded.routers) as cap:
        if generate > 0:
            ids = _generate(loaded, input_ids, generate, temperature, seed)
        else:
            if extra:  # vision tower, then language model; no head
                routing_forward(loaded, input_ids, **extra)
            elif loaded.kind == IMAGE_TEXT:  # the whole multimodal forward, text tokens only
                model(**loaded.forward_inputs(input_ids))
            else:
                routing_forward(loaded, input_ids)
            ids = input_ids[0]
    token_ids = ids.tolist()
    phases = ["prefill"] * prompt_len + ["decode"] * (len(token_ids) - prompt_len)
    strings = [tokenizer.decode([i]) for i in token_ids]
    raw = token_bytes(tokenizer, token_ids, strings)
    modality = modality_names(modality_codes(ids.cpu(), model.config)) if extra else None
    frame = route_frame(loaded.routers, cap.calls, token_ids, strings, phases, raw, modality)
    frame.attrs.update(
        text=text,
        prompt_tokens=prompt_len,
        generated_text=tokenizer.decode(token_ids[prompt_len:]) if generate else "",
    )
    return frame


def _generate(
    loaded: LoadedModel, input_ids: torch.Tensor, new_tokens: int, temperature: float, seed: int | None
) -> torch.Tensor:
    """Generate, then feed the last new token once more so every generated token has routing rows.

    generate computes the head on the last position only (it passes ``logits_to_keep=1``); the extra step
    runs no head at all.
    """
    if seed is not None:
        torch.manual_seed(seed)
    out = loaded.model.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=new_tokens,
        **sampling_options(temperature, loaded.tokenizer.pad_token_id),
    )
    sequence = out.sequences
    if sequence.shape[1] > input_ids.shape[1]:
        cache = kv_cache(out)
        if loaded.kind == IMAGE_TEXT:
            # Multimodal models derive 3-D RoPE positions from the mask; one unpadded sequence needs none.
            loaded.model(input_ids=sequence[:, -1:], use_cache=True, **cache)
        else:
            routing_forward(loaded, sequence[:, -1:], torch.ones_like(sequence), use_cache=True, **cache)
    return sequence[0]
