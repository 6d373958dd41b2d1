"""Image tokens through a vision-language model's own processor, told apart from text tokens by their ids.

A route row's or balance block's ``modality`` comes from the token id alone: the placeholder ids the config names
(``families.MODALITY_TOKEN_ATTRS``) are the positions whose embeddings the model replaces by vision (or video,
audio) features before the language model's first layer; every other token, chat-template markers included, is
text. ``balance`` accumulates each modality on its own beside one accumulator over all tokens, so ``all`` is
exactly what a run without the split measures and image + text counts add up to it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from moe_inspect import metrics
from moe_inspect.analysis.accumulate import BalanceAccumulator, RouterTotals
from moe_inspect.errors import UserError
from moe_inspect.io.corpus import Batch
from moe_inspect.io.images import check_image, image_chunks, image_files, open_image
from moe_inspect.model.families import MODALITIES, modality_token_ids
from moe_inspect.model.options import LoadOptions
from moe_inspect.model.routers import RouterSpec
from moe_inspect.model.source import check_takes_images, load_config, load_processor

DEFAULT_IMAGE_PROMPT = "Describe the image."
"""The text routed with each image of ``balance`` unless another is given: short and neutral."""


def check_image_run(by_file: bool = False, generate: int = 0) -> None:
    """What a run with images cannot be combined with, refused before anything is read or loaded."""
    if by_file:
        raise UserError("Per-file blocks and images cannot be combined; balance images apart from `by_file`.")
    if generate:
        raise UserError("Generating after images is not supported yet; route the prompt and images alone.")


def prepare_images(load: LoadOptions, model_id: str, images: Path | Sequence[Path]) -> tuple[list[Path], Any]:
    """The image files (a folder's, or the paths given) and the checkpoint's processor, before any weights load.

    Refused in one sentence, in this order: the model takes no images, a folder holds none, a file is missing
    or not an image, the checkpoint ships no processor.
    """
    check_takes_images(load_config(model_id, load.revision, load.trust_remote_code), model_id)
    files = image_files(images) if isinstance(images, Path) else list(images)
    for path in files:
        check_image(path)
    return files, load_processor(model_id, load.revision, load.trust_remote_code)


def modality_codes(input_ids: torch.Tensor, config: Any) -> torch.Tensor:
    """Per token, the index into ``MODALITIES`` (0 = text) of what the model embeds there; same shape, int64."""
    codes = torch.zeros_like(input_ids, dtype=torch.int64)
    for modality, token_id in modality_token_ids(config).items():
        codes = torch.where(input_ids == token_id, MODALITIES.index(modality), codes)
    return codes


def modality_names(codes: torch.Tensor) -> list[str]:
    """The ``modality`` column for a 1-D tensor of codes."""
    return [MODALITIES[int(c)] for c in codes.tolist()]


def _prompt_text(processor: Any, prompt: str, images: int) -> str:
    """The processor's chat template over one user turn (images first, then the prompt) when it has one, else the
    processor's image placeholder before the prompt: the processor itself then expands every placeholder into the
    number of tokens the vision tower produces (Qwen-VL's <|image_pad|> x grid/merge^2, Aria's <|img|> x 128...)."""
    if getattr(processor, "chat_template", None):
        content = [{"type": "image"} for _ in range(images)] + [{"type": "text", "text": prompt}]
        messages = [{"role": "user", "content": content}]
        return str(processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=False))
    placeholder = getattr(processor, "image_token", None)
    if not placeholder:
        raise UserError("The processor has neither a chat template nor an image placeholder token to place images.")
    # Qwen-VL processors name the markers their template wraps each image in; others have none
    start, end = getattr(processor, "vision_start_token", "") or "", getattr(processor, "vision_end_token", "") or ""
    return f"{start}{placeholder}{end}" * images + prompt


def processor_inputs(processor: Any, prompts: Sequence[str], images: Sequence[Sequence[Any]]) -> dict[str, Any]:
    """Model inputs for sequences ``prompts[i]`` with images ``images[i]`` (paths or PIL images), padded as a batch.

    Returns the processor's tensors (input_ids, attention_mask, pixel_values and whatever else the family needs).
    """
    texts = [_prompt_text(processor, p, len(imgs)) for p, imgs in zip(prompts, images, strict=True)]
    opened = [[open_image(i) for i in imgs] for imgs in images]
    try:
        encoded = processor(text=texts, images=opened, padding=True, return_tensors="pt")
    except (ValueError, TypeError, KeyError) as exc:
        raise UserError(f"The model's processor could not prepare the image(s): {str(exc).splitlines()[0]}") from None
    return dict(encoded)


def batch_of(inputs: dict[str, Any], config: Any, bytes_done: int) -> Batch:
    """A balance ``Batch`` carrying the processor's extra inputs (pixel values...) and each token's modality."""
    input_ids = inputs.pop("input_ids")
    mask = inputs.pop("attention_mask", None)
    mask = torch.ones_like(input_ids) if mask is None else mask.long()
    return Batch(
        input_ids=input_ids, attention_mask=mask, tokens=int(mask.sum()), bytes_done=bytes_done,
        modality=modality_codes(input_ids, config), model_inputs=inputs,
    )


def image_batches(
    processor: Any,
    files: Sequence[Path],
    prompt: str,
    batch_size: int,
    config: Any,
    bytes_before: int = 0,
    max_tokens: int | None = None,
) -> Iterator[Batch]:
    """One sequence per image file (the image, then ``prompt``), ``batch_size`` images per batch, opened per batch.

    ``bytes_done`` counts image file bytes after ``bytes_before`` (the text corpus's), for progress. With
    ``max_tokens``, images are taken whole while their real tokens fit: an image's tokens are one unit (its
    placeholder run stands for the whole picture), so the run stops before the first image that would overflow.
    """
    done, left = bytes_before, max_tokens
    for chunk in image_chunks(files, batch_size):
        inputs = processor_inputs(processor, [prompt] * len(chunk), [[f] for f in chunk])
        if left is not None:
            fits = _images_that_fit(inputs, left)
            if fits < len(chunk):  # prepared again for fewer images: a processor's tensors do not slice alike
                chunk = chunk[:fits]
                inputs = processor_inputs(processor, [prompt] * fits, [[f] for f in chunk]) if fits else {}
        if not chunk:
            return
        done += sum(f.stat().st_size for f in chunk)
        batch = batch_of(inputs, config, done)
        if left is not None:
            left -= batch.tokens
        yield batch


def _images_that_fit(inputs: dict[str, Any], budget: int) -> int:
    """How many leading sequences of a processed batch have real tokens adding up to at most ``budget``."""
    mask = inputs.get("attention_mask")
    per_row = inputs["input_ids"].shape[1] * torch.ones(len(inputs["input_ids"])) if mask is None else mask.sum(-1)
    return int((per_row.cumsum(0) <= budget).sum())


class ModalitySplit:
    """Balance accumulators per modality plus one over every token, fed by one capture sink.

    Text batches (no ``modality`` codes) count as text throughout.
    """

    def __init__(self, routers: list[RouterSpec], capacity_factors: tuple[float, ...], config: Any) -> None:
        names = ["text", *modality_token_ids(config)]
        self.parts = {name: BalanceAccumulator(routers, capacity_factors) for name in MODALITIES if name in names}
        self.all = BalanceAccumulator(routers, capacity_factors)

    @property
    def batches(self) -> int:
        return self.all.batches

    @property
    def accumulators(self) -> list[BalanceAccumulator]:
        return [*self.parts.values(), self.all]

    def begin_batch(self, attention_mask: torch.Tensor, modality: torch.Tensor | None = None) -> None:
        self.all.begin_batch(attention_mask)
        codes = torch.zeros_like(attention_mask) if modality is None else modality
        for name, part in self.parts.items():
            part.begin_batch(attention_mask * (codes == MODALITIES.index(name)))

    def end_batch(self) -> None:
        """The forward finished: every accumulator commits the batch (see ``BalanceAccumulator.end_batch``)."""
        for accumulator in self.accumulators:
            accumulator.end_batch()

    def __call__(self, spec: RouterSpec, out: Any) -> None:
        for accumulator in self.accumulators:
            accumulator(spec, out)

    def blocks(self) -> list[tuple[str, list[RouterTotals]]]:
        """(modality, totals) for each modality that had tokens, then ('all', totals)."""
        parts = [(name, acc.finish()) for name, acc in self.parts.items()]
        present = [(name, totals) for name, totals in parts if any(t.tokens for t in totals)]
        return [*present, ("all", self.all.finish())]


def load_distance(blocks: Sequence[tuple[str, list[RouterTotals]]], modality: str = "image") -> pd.DataFrame:
    """Per router, the total-variation distance between ``modality``'s and text's expert-load distributions.

    Routed experts only (null columns left out); NaN where either had no tokens at that router.
    """
    by_name = dict(blocks)
    rows = []
    for other, text in zip(by_name.get(modality, []), by_name.get("text", []), strict=False):
        e = other.spec.num_experts
        empty = other.count[:e].sum() == 0 or text.count[:e].sum() == 0
        tv = float("nan") if empty else metrics.total_variation(other.count[:e], text.count[:e])
        rows.append({"layer": other.spec.layer, "router": other.spec.kind, "tv": tv})
    return pd.DataFrame(rows, columns=["layer", "router", "tv"])
