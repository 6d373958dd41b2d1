"""``balance`` over image files: each image (then a fixed prompt) is one sequence, after any text batches, with
the tables split by modality (``analysis.modality``)."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from moe_inspect.analysis.balance import BalanceReport, Progress, run_balance
from moe_inspect.analysis.modality import image_batches
from moe_inspect.io.corpus import Batch, CorpusReader
from moe_inspect.model.loading import LoadedModel


def balance_images(
    loaded: LoadedModel,
    processor: Any,
    files: Sequence[Path],
    prompt: str,
    batch_size: int,
    reader: CorpusReader | None = None,
    corpus_info: dict[str, Any] | None = None,
    capacity_factors: tuple[float, ...] = (),
    progress: Progress | None = None,
    top_tokens: int = 0,
    min_count: int = 5,
    token_layers: Iterable[int] | None = None,
    max_tokens: int | None = None,
) -> BalanceReport:
    """Stream ``reader``'s text batches, then ``files`` ``batch_size`` images at a time (each opened with its batch
    only), through one modality-split balance run; ``corpus_info`` is the reader's run.json settings.

    ``max_tokens`` caps text and images together: the text reader stops at it, and images fill what is left
    (whole images only, see ``image_batches``)."""
    text_bytes = (reader.total_bytes or 0) if reader is not None else 0
    taken = [0]

    def text_batches() -> Iterator[Batch]:
        for batch in reader.batches() if reader is not None else ():
            taken[0] += batch.tokens
            yield batch

    def images() -> Iterator[Batch]:  # the budget left is known only once the text ran out
        left = None if max_tokens is None else max(0, max_tokens - taken[0])
        yield from image_batches(processor, files, prompt, batch_size, loaded.model.config, text_bytes, left)

    stream = itertools.chain(text_batches(), images())
    no_text = {"seq_len": None, "batch_size": batch_size, "mode": "images", "max_tokens": max_tokens}
    info = {**(corpus_info or no_text), "images": len(files), "image_prompt": prompt}
    report = run_balance(
        loaded, stream, capacity_factors, progress, info, top_tokens, min_count, token_layers, by_modality=True
    )
    report.run["corpus"] = [f.describe() for f in reader.files] if reader is not None else []
    report.run["image_files"] = [str(f) for f in files]
    return report
