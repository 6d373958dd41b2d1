"""Corpus files: validated before any model loads, then streamed as token batches of bounded size.

Memory stays flat whatever the file size: text is read in blocks, tokenized, packed into windows and
handed out batch by batch.
"""

from __future__ import annotations

import atexit
import codecs
import hashlib
import io
import itertools
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from moe_inspect.errors import UserError

_BLOCK = 1 << 20  # bytes read per step when hashing and validating
_TEXT_BLOCK = 1 << 18  # characters tokenized per step when packing


@dataclass(frozen=True)
class CorpusFile:
    """A validated corpus file: the name the user gave, where it is read from, size and hash."""

    name: str
    path: Path | None
    size: int
    sha256: str
    text: str | None = None  # in-memory text from the Python API instead of a file

    @classmethod
    def from_text(cls, text: str, name: str) -> CorpusFile:
        data = text.encode("utf-8")
        return cls(name=name, path=None, size=len(data), sha256=hashlib.sha256(data).hexdigest(), text=text)

    def open_text(self) -> io.TextIOBase:
        """A text stream over the file or the in-memory text; newlines kept as they are."""
        if self.text is not None:
            return io.StringIO(self.text, newline="")
        assert self.path is not None
        return self.path.open("r", encoding="utf-8", newline="")

    def describe(self) -> dict[str, Any]:
        return {"path": self.name, "bytes": self.size, "sha256": self.sha256}


@dataclass
class Batch:
    """Token ids and attention mask on the CPU, with how much of the corpus they cover."""

    input_ids: torch.Tensor  # (B, S) int64
    attention_mask: torch.Tensor  # (B, S) int64, 1 = real token
    tokens: int  # real tokens in this batch
    bytes_done: int  # corpus bytes consumed so far (for progress)


def _spool_stdin() -> Path:
    with tempfile.NamedTemporaryFile(prefix="moe-inspect-stdin-", suffix=".txt", delete=False) as handle:
        atexit.register(Path(handle.name).unlink, missing_ok=True)  # a piped corpus can be gigabytes
        shutil.copyfileobj(sys.stdin.buffer, handle)
    return Path(handle.name)


def check_file(name: str) -> CorpusFile:
    """Validate one file in a single pass (UTF-8, no NUL bytes, not blank) and hash it.

    '-' reads standard input into a temporary file first, so it can be validated and re-read.
    """
    path = _spool_stdin() if name == "-" else Path(name).expanduser()
    label = "standard input" if name == "-" else f"'{name}'"
    if not path.exists():
        raise UserError(f"Corpus file {label} does not exist.")
    if path.is_dir():
        raise UserError(f"Corpus file {label} is a directory; pass text files.")
    digest = hashlib.sha256()
    decoder = codecs.getincrementaldecoder("utf-8")()
    size = 0
    has_text = False
    with path.open("rb") as handle:
        while block := handle.read(_BLOCK):
            if b"\x00" in block:
                raise UserError(f"Corpus file {label} looks binary (it contains NUL bytes); pass UTF-8 text.")
            try:
                text = decoder.decode(block)
            except UnicodeDecodeError as exc:
                raise UserError(
                    f"Corpus file {label} is not UTF-8 text (invalid byte at offset {size + exc.start})."
                ) from None
            has_text = has_text or bool(text.strip())
            digest.update(block)
            size += len(block)
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise UserError(f"Corpus file {label} is not UTF-8 text (it ends inside a character).") from None
    if not has_text:
        raise UserError(f"Corpus file {label} is empty.")
    return CorpusFile(name=name, path=path, size=size, sha256=digest.hexdigest())


def check_files(names: list[str]) -> list[CorpusFile]:
    if not names:
        raise UserError("Give at least one corpus file (or '-' for standard input).")
    if names.count("-") > 1:
        raise UserError("Standard input ('-') can be given only once.")
    return [check_file(name) for name in names]


def _text_blocks(source: CorpusFile) -> Iterator[tuple[str, int]]:
    """Blocks of text ending at a line break where possible, with the bytes each consumed."""
    with source.open_text() as handle:
        carry = ""
        while chunk := handle.read(_TEXT_BLOCK):
            text = carry + chunk
            cut = text.rfind("\n") + 1
            if cut == 0:
                carry = text
                continue
            carry = text[cut:]
            yield text[:cut], len(text[:cut].encode("utf-8"))
        if carry:
            yield carry, len(carry.encode("utf-8"))


def _stream_prefix(tokenizer: Any) -> list[int]:
    """The special tokens the tokenizer puts in front of a text by default (e.g. BOS), once per stream."""
    with_special = tokenizer("a")["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    if plain and with_special[-len(plain) :] == plain:
        return list(with_special[: len(with_special) - len(plain)])
    return []


@dataclass
class CorpusReader:
    """Turns validated files into batches: packed windows by default, one sequence per line with ``lines``."""

    files: list[CorpusFile]
    tokenizer: Any
    seq_len: int
    batch_size: int
    lines: bool = False
    max_tokens: int | None = None
    unrouted_tail_tokens: int = field(default=0, init=False)  # set once the packed stream is exhausted
    # the stream check_long_enough started, handed to the next batches() so the first block is tokenized once
    _primed: tuple[tuple[int, bool], Iterator[tuple[list[int], int]]] | None = field(
        default=None, init=False, repr=False
    )

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def check_long_enough(self) -> None:
        """Fail before the model loads when the corpus cannot fill a single window (or has no line)."""
        stream = self._sequences()
        first = next(stream, None)
        if first is not None:
            self._primed = ((self.seq_len, self.lines), itertools.chain([first], stream))
            return
        if self.lines:
            raise UserError("The corpus has no non-empty line.")
        raise UserError(
            f"The corpus is shorter than one window of {self.seq_len} tokens; pass a smaller --seq-len "
            "or use --lines."
        )

    def _windows(self) -> Iterator[tuple[list[int], int]]:
        prefix = _stream_prefix(self.tokenizer)
        done = 0
        self.unrouted_tail_tokens = 0
        for corpus_file in self.files:
            buffer: list[int] = list(prefix)
            for text, consumed in _text_blocks(corpus_file):
                done += consumed
                # verbose=False: a block is longer than the model's context by design; windows cut it later
                buffer.extend(self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
                full = len(buffer) - len(buffer) % self.seq_len
                for start in range(0, full, self.seq_len):
                    yield buffer[start : start + self.seq_len], done
                del buffer[:full]
            self.unrouted_tail_tokens += len(buffer)  # each file's last partial window is not routed

    def _line_sequences(self) -> Iterator[tuple[list[int], int]]:
        done = 0
        for corpus_file in self.files:
            with corpus_file.open_text() as handle:
                for line in handle:
                    done += len(line.encode("utf-8"))
                    text = line.rstrip("\r\n")
                    if not text.strip():
                        continue
                    ids = self.tokenizer(text, truncation=True, max_length=self.seq_len)["input_ids"]
                    if ids:
                        yield list(ids), done

    def _sequences(self) -> Iterator[tuple[list[int], int]]:
        return self._line_sequences() if self.lines else self._windows()

    def _collate(self, sequences: list[list[int]], done: int) -> Batch:
        padded = self.tokenizer.pad({"input_ids": sequences}, padding=True, return_tensors="pt")
        mask = padded["attention_mask"].long()
        return Batch(padded["input_ids"].long(), mask, int(mask.sum()), done)

    def batches(self) -> Iterator[Batch]:
        """Batches of at most ``batch_size`` sequences, stopping once ``max_tokens`` real tokens were taken."""
        pending: list[list[int]] = []
        taken = 0
        done = 0
        primed, self._primed = self._primed, None
        stream = primed[1] if primed is not None and primed[0] == (self.seq_len, self.lines) else self._sequences()
        for ids, done in stream:
            if self.max_tokens is not None:
                room = self.max_tokens - taken
                if room <= 0:
                    break
                ids = ids[:room]
            pending.append(ids)
            taken += len(ids)
            if len(pending) == self.batch_size:
                yield self._collate(pending, done)
                pending = []
        if pending:
            yield self._collate(pending, done)
