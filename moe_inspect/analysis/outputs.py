"""The model's output, position chunk by position chunk, never a batch's whole [B, S, V] logits.

Loss (``ablate``) and output agreement (``compare``) need the next-token distribution at every real position,
but a batch of 8 x 2048 tokens over a 200k vocabulary is 13 GB of float32 logits. So the decoder runs once and
the head runs on chunks of positions. The head is the model's *own* forward (its ``lm_head`` and each family's
post-processing: Granite divides by ``logits_scaling``, Gemma-4 soft-caps, Cohere multiplies by
``logit_scale``), called with ``logits_to_keep`` selecting the chunk while its decoder is replaced by a module
that replays the stored decoder output. No family rule is re-implemented here, and a test compares the chunks
with the model's full logits for every family.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from moe_inspect.errors import UserError

#: Bytes of float32 logits one chunk may hold; the chunk's positions follow from it and the vocabulary size.
#: A chunk costs about twice this at its peak (the logits and their log-softmax): 128 MiB, less than a 4 x 2048
#: batch's decoder activations in most models, so a loss pass peaks about where the routing pass does
#: (BENCHMARKS.md), while a chunk still has 100+ positions for a 150k vocabulary, enough for an efficient matmul.
CHUNK_BYTES = 64 * 2**20


class _Replay(nn.Module):
    """Stands in for the decoder: returns the output it was given, whatever it is called with."""

    def __init__(self, output: Any) -> None:
        super().__init__()
        self.output = output

    def forward(self, *_args: Any, **_kwargs: Any) -> Any:
        return self.output


@dataclass
class DecoderPass:
    """One batch's decoder output and the inputs the head needs alongside it."""

    output: Any  # the decoder's ModelOutput (last_hidden_state and whatever else the head reads)
    input_ids: torch.Tensor
    attention_mask: torch.Tensor


def decoder_of(model: nn.Module) -> tuple[str, nn.Module] | None:
    """(attribute name, module) of a causal LM's decoder, or None when there is no single one.

    The causal LM's forward calls its decoder as a child attribute whose name varies (``model``,
    ``language_model``, ``transformer``): it is the one child that is itself a pretrained model.
    """
    from transformers import PreTrainedModel

    children = [(name, child) for name, child in model.named_children() if isinstance(child, PreTrainedModel)]
    return children[0] if len(children) == 1 else None


class OutputHead:
    """Runs a causal LM's decoder once per batch and its head on chunks of positions.

    Families whose forward cannot select positions (no ``logits_to_keep``) are refused in one sentence rather
    than silently computing the full logits.
    """

    def __init__(self, model: nn.Module, chunk_bytes: int = CHUNK_BYTES) -> None:
        found = decoder_of(model)
        if found is None:
            raise UserError(f"{type(model).__name__} has no single decoder module, so its output cannot be chunked.")
        prefix, decoder = found
        if "logits_to_keep" not in inspect.signature(model.forward).parameters:
            raise UserError(f"{type(model).__name__} cannot compute logits for chosen positions only.")
        self.model = model
        self.prefix = prefix
        self.decoder = decoder
        self.chunk_bytes = chunk_bytes
        head = model.get_output_embeddings()
        config_vocab = model.config.get_text_config().vocab_size
        self.vocab_size = int(head.weight.shape[0]) if head is not None else int(config_vocab)

    def decode(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor | None = None
    ) -> DecoderPass:
        """The decoder's forward alone (routers fire here); no logits."""
        output = self.decoder(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        )
        return DecoderPass(output, input_ids, attention_mask)

    @contextmanager
    def _replaying(self, output: Any) -> Iterator[None]:
        replay = _Replay(output)
        setattr(self.model, self.prefix, replay)
        try:
            yield
        finally:
            setattr(self.model, self.prefix, self.decoder)

    def chunk_positions(self) -> int:
        """Positions per chunk, so that one chunk's float32 logits fit in ``chunk_bytes``."""
        return max(1, self.chunk_bytes // (4 * self.vocab_size))

    def logits(self, decoded: DecoderPass, keep: torch.Tensor) -> torch.Tensor:
        """float32 logits (N, V) of the positions where the boolean (B, S) ``keep`` is true, in row-major order."""
        with self._replaying(decoded.output):
            out = self.model(
                input_ids=decoded.input_ids,
                attention_mask=decoded.attention_mask,
                logits_to_keep=keep,
                use_cache=False,
            )
        return out.logits.reshape(-1, out.logits.shape[-1]).float()

    def chunks(self, decoded: DecoderPass, positions: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(keep mask, logits) per chunk of the boolean (B, S) ``positions``; chunks follow row-major order."""
        flat = positions.flatten().nonzero().squeeze(-1)
        step = self.chunk_positions()
        for start in range(0, flat.numel(), step):
            keep = torch.zeros(positions.numel(), dtype=torch.bool, device=positions.device)
            keep[flat[start : start + step]] = True
            keep = keep.view_as(positions)
            yield keep, self.logits(decoded, keep)


def predicted_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, S) bool: positions whose next position is a real token, i.e. where a next-token loss exists."""
    mask = attention_mask.bool()
    out = torch.zeros_like(mask)
    out[:, :-1] = mask[:, :-1] & mask[:, 1:]
    return out


def next_token_targets(input_ids: torch.Tensor) -> torch.Tensor:
    """(B, S) target ids: position i predicts token i + 1 (the last column is never used)."""
    targets = torch.zeros_like(input_ids)
    targets[:, :-1] = input_ids[:, 1:]
    return targets


def token_losses(head: OutputHead, decoded: DecoderPass) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross entropy (float64 scalar on the device) and the number of predicted positions.

    Token-weighted: each real next-token prediction counts once, whatever sequence it is in. Sums stay on the
    device; the caller copies them when it needs the number.
    """
    positions = predicted_positions(decoded.attention_mask)
    targets = next_token_targets(decoded.input_ids)
    total = torch.zeros((), dtype=torch.float64, device=decoded.input_ids.device)
    for keep, logits in head.chunks(decoded, positions):
        losses = torch.nn.functional.cross_entropy(logits, targets[keep].to(logits.device), reduction="sum")
        total += losses.to(total.device, torch.float64)
    return total, positions.sum()


def topk_logprobs(
    head: OutputHead, decoded: DecoderPass, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per predicted position: the top-``k`` log-probabilities and their ids, and the log of the remaining mass.

    Returns ``(values (N, k), ids (N, k), rest_logmass (N,), positions (B, S) bool)`` in row-major position order,
    enough to compare two models' outputs (top-1 agreement, KL over the top-k support plus the rest) without
    keeping any full distribution.
    """
    positions = predicted_positions(decoded.attention_mask)
    values: list[torch.Tensor] = []
    ids: list[torch.Tensor] = []
    rest: list[torch.Tensor] = []
    for _keep, logits in head.chunks(decoded, positions):
        logprobs = torch.log_softmax(logits, dim=-1)
        top = logprobs.topk(min(k, logprobs.shape[-1]), dim=-1)
        values.append(top.values)
        ids.append(top.indices)
        kept_mass = top.values.exp().sum(-1).clamp(max=1.0)
        rest.append(torch.log1p(-kept_mass.clamp(max=1 - 1e-7)))
    if not values:
        empty = torch.empty(0, k, device=decoded.input_ids.device)
        return empty, empty.long(), empty[:, 0], positions
    return torch.cat(values), torch.cat(ids), torch.cat(rest), positions


def logprobs_at(
    head: OutputHead, decoded: DecoderPass, ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """This model's log-probabilities of given token ids at every predicted position, chunk by chunk.

    ``ids`` (N, k) are another model's top-k ids in the row-major position order of ``topk_logprobs``. Returns
    ``(values (N, k), rest_logmass (N,), top_logprob (N,))``: the log-probs at those ids, the log of the mass
    outside them and this model's highest log-prob (the other model's top-1 token is also this one's when its value
    equals it, ties included), the parts of a two-model output comparison that need this model's logits. Computed
    with the same ops as ``topk_logprobs``, so a model compared with itself matches bit for bit.
    """
    positions = predicted_positions(decoded.attention_mask)
    values: list[torch.Tensor] = []
    rest: list[torch.Tensor] = []
    top: list[torch.Tensor] = []
    start = 0
    for _keep, logits in head.chunks(decoded, positions):
        logprobs = torch.log_softmax(logits, dim=-1)
        chunk_ids = ids[start : start + logprobs.shape[0]].to(logprobs.device)
        start += logprobs.shape[0]
        picked = logprobs.gather(-1, chunk_ids)
        values.append(picked)
        kept_mass = picked.exp().sum(-1).clamp(max=1.0)
        rest.append(torch.log1p(-kept_mass.clamp(max=1 - 1e-7)))
        top.append(logprobs.max(-1).values)
    if start != ids.shape[0]:
        raise ValueError(f"{ids.shape[0]} rows of ids for {start} predicted positions")
    if not values:
        empty = torch.empty(0, ids.shape[-1], device=decoded.input_ids.device)
        return empty, empty[:, 0], empty[:, 0]
    return torch.cat(values), torch.cat(rest), torch.cat(top)
