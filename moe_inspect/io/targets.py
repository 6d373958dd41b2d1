"""Aligned targets for encoder-decoder balance: line i of the target file is the decoder's text for source line i.

The decoder routes its start token then the target's tokens (no end mark), as ``route --target`` does. Lines are
paired by their number across all source files in order, blank lines included, so a count mismatch is caught
before the model loads where both sides are files (standard input is checked as it runs out).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from moe_inspect.errors import UserError
from moe_inspect.io.corpus import Batch, CorpusFile, CorpusReader, check_file


def _lines(files: list[CorpusFile]) -> Iterator[tuple[str, int]]:
    """Every line (newline stripped) with its bytes, file after file."""
    for corpus_file in files:
        with corpus_file.open_text() as handle:
            for line in handle:
                yield line.rstrip("\r\n"), len(line.encode("utf-8"))


def _mismatch(sources: int | str, targets: int | str) -> UserError:
    return UserError(
        f"The target file has {targets} lines but the corpus has {sources}; give one target line per source line."
    )


def check_aligned(reader: CorpusReader, target: CorpusFile) -> None:
    """Refuse targets without line mode or with another line count than the corpus (when both can be counted)."""
    if not reader.lines:
        raise UserError("Aligned targets pair lines: measure the corpus one line per sequence (`lines`).")
    stdin_sources = any(f.stream is not None for f in reader.files)
    if target.stream is not None and stdin_sources:
        raise UserError("Standard input ('-') can be given only once.")
    if target.stream is not None or stdin_sources:
        return  # standard input is counted as it is read (paired_batches)
    sources = sum(1 for _ in _lines(reader.files))
    targets = sum(1 for _ in _lines([target]))
    if sources != targets:
        raise _mismatch(sources, targets)


def target_source(targets: str | Path | Iterable[str] | CorpusFile, seq2seq: bool) -> CorpusFile:
    """The targets as a validated corpus file: a path (or '-'), or in-memory lines, one per source line."""
    if not seq2seq:
        raise UserError("Aligned targets are only for encoder-decoder models; this one is decoder-only.")
    if isinstance(targets, CorpusFile):
        return targets
    if isinstance(targets, (str, Path)):
        return check_file(str(targets))
    lines = list(targets)
    if any("\n" in line or "\r" in line for line in lines):
        raise UserError("Each target must be one line of text.")
    return CorpusFile.from_text("".join(f"{line}\n" for line in lines), "<targets>")


def _pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right padding: the decoder's positions then start at its start token in every row."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return ids, mask


def paired_batches(reader: CorpusReader, target: CorpusFile, start_id: int) -> Iterator[Batch]:
    """``reader``'s line batches with each line's target as decoder rows; a blank source line is skipped with
    its target, a blank target routes the start token alone. ``max_tokens`` counts source tokens."""
    tokenizer, seq_len = reader.tokenizer, reader.seq_len
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else start_id
    targets = _lines([target])
    pending: list[tuple[list[int], list[int]]] = []
    taken = done = sources = 0

    def collate() -> Batch:
        padded = tokenizer.pad({"input_ids": [s for s, _ in pending]}, padding=True, return_tensors="pt")
        mask = padded["attention_mask"].long()
        decoder_ids, decoder_mask = _pad([t for _, t in pending], pad_id)
        return Batch(padded["input_ids"].long(), mask, int(mask.sum()), done, decoder_ids, decoder_mask)

    for text, consumed in _lines(reader.files):
        sources += 1
        target_line = next(targets, None)
        if target_line is None:
            raise _mismatch(f"more than {sources - 1}", sources - 1)
        done += consumed
        if not text.strip():
            continue
        ids = list(tokenizer(text, truncation=True, max_length=seq_len)["input_ids"])
        if not ids:
            continue
        if reader.max_tokens is not None:
            room = reader.max_tokens - taken
            if room <= 0:
                break
            ids = ids[:room]
        taken += len(ids)
        target_ids = tokenizer(target_line[0], add_special_tokens=False)["input_ids"] if target_line[0] else []
        pending.append((ids, [start_id, *target_ids][:seq_len]))
        if len(pending) == reader.batch_size:
            yield collate()
            pending = []
    else:
        if next(targets, None) is not None:
            raise _mismatch(sources, f"more than {sources}")
    if pending:
        yield collate()
