"""Corpus files: validated before any model loads, then streamed as token batches of bounded size.

Memory stays flat whatever the file size: text is read in blocks, tokenized, packed into windows and
handed out batch by batch. Standard input is never copied anywhere: it is validated, hashed and tokenized
as it arrives, so `--max-tokens` bounds what is read and an endless pipe fills no disk.
"""

from __future__ import annotations

import codecs
import hashlib
import io
import itertools
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import torch

from moe_inspect.errors import UserError

_BLOCK = 1 << 20  # bytes read per step when hashing and validating
_TEXT_BLOCK = 1 << 18  # characters tokenized per step when packing


class _Validator:
    """One pass of checks over a byte stream: UTF-8, no NUL, not blank; with its size and sha256."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.digest = hashlib.sha256()
        self.decoder = codecs.getincrementaldecoder("utf-8")()
        self.size = 0
        self.has_text = False

    def feed(self, block: bytes) -> None:
        if b"\x00" in block:
            raise UserError(f"Corpus file {self.label} looks binary (it contains NUL bytes); pass UTF-8 text.")
        try:
            text = self.decoder.decode(block)
        except UnicodeDecodeError as exc:
            raise UserError(
                f"Corpus file {self.label} is not UTF-8 text (invalid byte at offset {self.size + exc.start})."
            ) from None
        self.has_text = self.has_text or bool(text.strip())
        self.digest.update(block)
        self.size += len(block)

    def finish(self) -> None:
        try:
            self.decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise UserError(f"Corpus file {self.label} is not UTF-8 text (it ends inside a character).") from None
        if not self.has_text:
            raise UserError(f"Corpus file {self.label} is empty.")


class StdinStream:
    """Standard input, read once: checked and hashed as it arrives, never spooled to disk.

    The first reader's bytes are kept so a second reader sees the stream from its start; later bytes are
    read, used and dropped. When the run takes over the pre-load check's own stream (the usual case, see
    ``CorpusReader.check_long_enough``), there is no second reader and ``release`` stops the keeping.
    """

    def __init__(self, raw: BinaryIO) -> None:
        self._read = getattr(raw, "read1", raw.read)  # read1: what has arrived, without waiting for a full block
        self._kept: list[bytes] = []
        self._started = False
        self._keeping = True  # the first reader keeps its bytes until a second one replays them or none will
        self.check = _Validator("standard input")
        self.done = False

    def blocks(self) -> Iterator[bytes]:
        """Bytes from the start of the stream (what an earlier reader took is replayed first)."""
        first, self._started = not self._started, True
        if not first:
            self._keeping = False
        yield from list(self._kept)
        while not self.done:
            block = self._read(_BLOCK)
            if not block:
                self.done = True
                self.check.finish()
                return
            self.check.feed(block)
            if first and self._keeping:
                self._kept.append(block)
            yield block

    def release(self) -> None:
        """The first reader reads on to the end itself (the run took over the check's stream): keep nothing."""
        self._keeping = False
        self._kept.clear()

    def open_text(self) -> io.TextIOBase:
        return io.TextIOWrapper(io.BufferedReader(_BlockReader(self.blocks())), encoding="utf-8", newline="")


class _BlockReader(io.RawIOBase):
    """A raw stream over an iterator of byte blocks (for TextIOWrapper)."""

    def __init__(self, blocks: Iterator[bytes]) -> None:
        self._blocks = blocks
        self._pending = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if not self._pending:
            self._pending = next(self._blocks, b"")
        n = min(len(buffer), len(self._pending))
        buffer[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n


@dataclass(frozen=True)
class CorpusFile:
    """A validated corpus file: the name the user gave, where it is read from, size and hash."""

    name: str
    path: Path | None
    size: int
    sha256: str
    text: str | None = None  # in-memory text from the Python API instead of a file
    stream: StdinStream | None = None  # standard input: size and hash are known once it has been read

    @classmethod
    def from_text(cls, text: str, name: str) -> CorpusFile:
        data = text.encode("utf-8")
        return cls(name=name, path=None, size=len(data), sha256=hashlib.sha256(data).hexdigest(), text=text)

    def open_text(self) -> io.TextIOBase:
        """A text stream over the file or the in-memory text; newlines kept as they are."""
        if self.text is not None:
            return io.StringIO(self.text, newline="")
        if self.stream is not None:
            return self.stream.open_text()
        assert self.path is not None
        return self.path.open("r", encoding="utf-8", newline="")

    def describe(self) -> dict[str, Any]:
        if self.stream is not None:  # what was read of it (all of it unless max_tokens stopped early)
            check = self.stream.check
            return {"path": self.name, "bytes": check.size, "sha256": check.digest.hexdigest()}
        return {"path": self.name, "bytes": self.size, "sha256": self.sha256}


@dataclass
class Batch:
    """Token ids and attention mask on the CPU, with how much of the corpus they cover."""

    input_ids: torch.Tensor  # (B, S) int64
    attention_mask: torch.Tensor  # (B, S) int64, 1 = real token
    tokens: int  # real tokens in this batch
    bytes_done: int  # corpus bytes consumed so far (for progress)
    # encoder-decoders with aligned targets (io.targets): the decoder's rows, right-padded, 1 = real token
    decoder_input_ids: torch.Tensor | None = None
    decoder_attention_mask: torch.Tensor | None = None
    modality: torch.Tensor | None = None  # (B, S) index into families.MODALITIES per token; None: all text
    model_inputs: dict[str, Any] | None = None  # a processor's other inputs (pixel_values...), for image batches


def check_file(name: str) -> CorpusFile:
    """Validate one file in a single pass (UTF-8, no NUL bytes, not blank) and hash it.

    '-' is standard input: it is checked as it is read, so its errors surface when the first window is
    tokenized (still before the model loads, through ``CorpusReader.check_long_enough``).
    """
    if name == "-":
        return CorpusFile(name=name, path=None, size=0, sha256="", stream=StdinStream(sys.stdin.buffer))
    path = Path(name).expanduser()
    label = f"'{name}'"
    if not path.exists():
        hint = "; flags take no value" if name.lower() in {"true", "false", "yes", "no", "on", "off"} else ""
        raise UserError(f"Corpus file {label} does not exist{hint}.")
    if path.is_dir():
        raise UserError(f"Corpus file {label} is a directory; pass text files.")
    check = _Validator(label)
    with path.open("rb") as handle:
        while block := handle.read(_BLOCK):
            check.feed(block)
    check.finish()
    return CorpusFile(name=name, path=path, size=check.size, sha256=check.digest.hexdigest())


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
    # Each source is a document: packed into windows of its own, its last partial window routed too (padded).
    # The API's default for in-memory texts, so a list of short texts is not refused as "too short".
    documents: bool = False
    unrouted_tail_tokens: int = field(default=0, init=False)  # set once the packed stream is exhausted
    # the stream check_long_enough started, handed to the next batches() so the first block is tokenized once
    _primed: tuple[tuple[int, bool, bool], Iterator[tuple[list[int], int]]] | None = field(
        default=None, init=False, repr=False
    )

    @property
    def _shape(self) -> tuple[int, bool, bool]:
        """What the sequences depend on besides the files: a primed stream serves only the same shape."""
        return self.seq_len, self.lines, self.documents

    @property
    def mode(self) -> str:
        return "lines" if self.lines else "documents" if self.documents else "packed"

    @property
    def total_bytes(self) -> int | None:
        """Bytes to read, for progress; None when standard input is among the files (its end is unknown)."""
        if any(f.stream is not None for f in self.files):
            return None
        return sum(f.size for f in self.files)

    def check_long_enough(self) -> None:
        """Fail before the model loads when the corpus cannot fill a single window (or has no line)."""
        stream = self._sequences()
        first = next(stream, None)
        if first is not None:
            self._primed = (self._shape, itertools.chain([first], stream))
            return
        if self.lines:
            raise UserError("The corpus has no non-empty line.")
        raise UserError(
            f"The corpus is shorter than one window of {self.seq_len} tokens; pass a smaller `seq_len` "
            "or use `lines=True`."
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
            if self.documents and buffer and buffer != prefix:
                yield buffer, done
            else:
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
        if primed is not None and primed[0] == self._shape:
            stream = primed[1]
            for source in self.files:  # standard input need not be replayed: its first reader reads on
                if source.stream is not None:
                    source.stream.release()
        else:
            stream = self._sequences()
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
