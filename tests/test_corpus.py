"""Corpus files: validated before any model loads (one sentence, exit 2), then streamed as exact batches."""

from __future__ import annotations

import hashlib
import importlib
import inspect
import io
import itertools
from pathlib import Path
from typing import Any

import pytest
import torch
from tiny_models import LINES, SAMPLE_TEXT, tiny_config, train_tiny_tokenizer
from typer.testing import CliRunner

import moe_inspect.api
import moe_inspect.cli.common
import moe_inspect.io.corpus
import moe_inspect.model.loading
from moe_inspect.cli import app
from moe_inspect.errors import UserError
from moe_inspect.io.corpus import CorpusFile, CorpusReader, check_file, check_files

runner = CliRunner()
cli_balance = importlib.import_module("moe_inspect.cli.balance")  # the package attribute is the command


def _flat(rows: list[list[int]]) -> list[int]:
    return list(itertools.chain.from_iterable(rows))


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return train_tiny_tokenizer(bos=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer: Any) -> Path:
    """A model folder with a config and a tokenizer but no weights: loading the model could never succeed."""
    path = tmp_path_factory.mktemp("no-weights")
    tiny_config("mixtral").save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _reader(tokenizer: Any, texts: list[str], seq_len: int, batch_size: int = 2, **kwargs: Any) -> CorpusReader:
    files = [CorpusFile.from_text(t, f"<text {i}>") for i, t in enumerate(texts)]
    return CorpusReader(files, tokenizer, seq_len, batch_size, **kwargs)


def _rows(reader: CorpusReader) -> list[list[int]]:
    """Every sequence of every batch, pads removed."""
    rows = []
    for batch in reader.batches():
        assert batch.tokens == int(batch.attention_mask.sum())
        for ids, mask in zip(batch.input_ids, batch.attention_mask, strict=True):
            rows.append(ids[mask.bool()].tolist())
    return rows


# ------------------------------------------------------------------------------------------------------
# bad input: one sentence, exit code 2, and the model is never loaded
# ------------------------------------------------------------------------------------------------------


@pytest.fixture
def no_model_load(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_args: Any, **_kwargs: Any) -> Any:
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(cli_balance, "load_for_cli", refuse)
    monkeypatch.setattr(moe_inspect.api, "load", refuse)
    monkeypatch.setattr(moe_inspect.api, "load_model", refuse)
    monkeypatch.setattr(moe_inspect.model.loading, "load", refuse)


def _bad_corpus(tmp_path: Path, kind: str) -> str:
    path = tmp_path / f"{kind}.txt"
    if kind == "missing":
        return str(path)
    if kind == "directory":
        path.mkdir()
        return str(path)
    content = {
        "empty": b"",
        "whitespace": b"  \n\t\r\n\n   ",
        "binary": b"some text\x00\x01\x02 more",
        "latin1": "caf\u00e9 cr\u00e8me br\u00fbl\u00e9e\n".encode("latin-1"),
        "truncated_utf8": "caf\u00e9".encode()[:-1],
        "short": b"hi there\n",
    }[kind]
    path.write_bytes(content)
    return str(path)


BAD = {
    "missing": "does not exist",
    "directory": "is a directory",
    "empty": "is empty",
    "whitespace": "is empty",
    "binary": "looks binary",
    "latin1": "is not UTF-8 text",
    "truncated_utf8": "is not UTF-8 text",
    "short": "shorter than one window of 64 tokens",
}


@pytest.mark.usefixtures("no_model_load")
@pytest.mark.parametrize("kind", sorted(BAD))
def test_bad_corpus_exits_2_before_loading(kind: str, tmp_path: Path, model_dir: Path) -> None:
    name = _bad_corpus(tmp_path, kind)
    result = runner.invoke(
        app, ["balance", name, "-m", str(model_dir), "--seq-len", "64", "--out", str(tmp_path / "o")]
    )
    output = result.output + result.stderr
    assert result.exit_code == 2, (output, result.exception)
    assert "Traceback" not in output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("Error: ") and lines[0].endswith("."), lines[0]
    assert BAD[kind] in lines[0]
    if kind != "short":
        assert name in lines[0]  # the sentence names the file
    assert not (tmp_path / "o").exists()


@pytest.mark.usefixtures("no_model_load")
def test_bad_file_among_good_ones_and_empty_stdin(tmp_path: Path, model_dir: Path) -> None:
    good = tmp_path / "good.txt"
    good.write_text(SAMPLE_TEXT, encoding="utf-8")
    bad = _bad_corpus(tmp_path, "binary")
    result = runner.invoke(app, ["balance", str(good), bad, "-m", str(model_dir), "--seq-len", "8"])
    assert result.exit_code == 2 and "looks binary" in result.stderr and bad in result.stderr
    result = runner.invoke(app, ["balance", "-", "-m", str(model_dir), "--seq-len", "8"], input="")
    assert result.exit_code == 2 and "standard input is empty" in result.stderr
    result = runner.invoke(app, ["balance", "-", "-", "-m", str(model_dir)], input="abc")
    assert result.exit_code == 2 and "only once" in result.stderr


def test_check_file_messages_and_hash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for kind, needle in BAD.items():
        if kind == "short":
            continue
        with pytest.raises(UserError, match=needle):
            check_file(_bad_corpus(tmp_path, kind))
    with pytest.raises(UserError, match="at least one"):
        check_files([])
    # Multi-byte characters split across read blocks are fine; the hash and size are of the raw bytes.
    monkeypatch.setattr(moe_inspect.io.corpus, "_BLOCK", 3)
    text = "na\u00efve \u65e5\u672c\u8a9e \U0001f600 caf\u00e9\r\n" * 5
    path = tmp_path / "utf8.txt"
    path.write_bytes(text.encode("utf-8"))
    checked = check_file(str(path))
    assert checked.sha256 == hashlib.sha256(text.encode("utf-8")).hexdigest()
    assert checked.size == len(text.encode("utf-8"))
    assert checked.describe() == {"path": str(path), "bytes": checked.size, "sha256": checked.sha256}
    with pytest.raises(UserError, match="offset 3"):  # the byte offset of the bad byte, across blocks
        check_file(_write(tmp_path / "bad.txt", b"abc\xff def"))


def test_stdin_is_streamed_never_spooled(monkeypatch: pytest.MonkeyPatch, tokenizer: Any) -> None:
    """Standard input is read as it is used: a peek before the run is replayed, and max_tokens stops reading."""
    data = (SAMPLE_TEXT * 200).encode("utf-8")
    raw = io.BytesIO(data)
    monkeypatch.setattr(moe_inspect.io.corpus.sys, "stdin", io.TextIOWrapper(raw))
    monkeypatch.setattr(moe_inspect.io.corpus, "_BLOCK", 4096)
    monkeypatch.setattr(moe_inspect.io.corpus, "_TEXT_BLOCK", 1024)
    checked = check_file("-")
    assert checked.name == "-" and checked.path is None and raw.tell() == 0  # nothing read, nothing written
    reader = CorpusReader([checked], tokenizer, 16, 4, max_tokens=64)
    reader.check_long_enough()
    rows = _rows(reader)
    assert sum(len(r) for r in rows) == 64
    assert raw.tell() < len(data) // 4  # stopped reading once max_tokens were taken
    ids = tokenizer(SAMPLE_TEXT * 200)["input_ids"]
    assert [t for r in rows for t in r] == ids[:64]  # the peeked bytes were replayed, in order
    full = CorpusReader([check_file_from(data, monkeypatch)], tokenizer, 16, 4)
    full.check_long_enough()
    assert [t for r in _rows(full) for t in r] == ids[: len(ids) // 16 * 16]
    assert full.files[0].describe() == {"path": "-", "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def check_file_from(data: bytes, monkeypatch: pytest.MonkeyPatch) -> CorpusFile:
    monkeypatch.setattr(moe_inspect.io.corpus.sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))
    return check_file("-")


@pytest.mark.parametrize(
    ("data", "needle"),
    [(b"", "standard input is empty"), (b"ok\x00", "looks binary"), (b"caf\xe9 x", "not UTF-8 text")],
)
def test_bad_stdin_is_refused_by_the_pre_load_check(
    data: bytes, needle: str, monkeypatch: pytest.MonkeyPatch, tokenizer: Any
) -> None:
    reader = CorpusReader([check_file_from(data, monkeypatch)], tokenizer, 4, 1)
    with pytest.raises(UserError, match=needle):
        reader.check_long_enough()


def _write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


# ------------------------------------------------------------------------------------------------------
# packed windows
# ------------------------------------------------------------------------------------------------------


def test_packed_windows_exact_bos_once_and_tokens_conserved(tokenizer: Any) -> None:
    seq_len = 16
    full = tokenizer(SAMPLE_TEXT)["input_ids"]
    bos = tokenizer.bos_token_id
    assert full[0] == bos and bos not in full[1:]  # the tokenizer prefixes BOS by default
    reader = _reader(tokenizer, [SAMPLE_TEXT], seq_len, batch_size=3)
    batches = list(reader.batches())
    assert all(b.input_ids.shape[1] == seq_len and bool(b.attention_mask.all()) for b in batches)
    assert [b.input_ids.shape[0] for b in batches[:-1]] == [3] * (len(batches) - 1)
    rows = torch.cat([b.input_ids for b in batches]).reshape(-1).tolist()
    assert rows == full[: len(full) // seq_len * seq_len]
    assert sum(b.tokens for b in batches) == len(full) // seq_len * seq_len
    assert batches[-1].bytes_done == len(SAMPLE_TEXT.encode("utf-8"))


def test_each_file_is_its_own_stream(tokenizer: Any) -> None:
    seq_len = 8
    texts = [SAMPLE_TEXT, "def add(a, b):\n    return a + b\n" * 4]
    rows = _rows(_reader(tokenizer, texts, seq_len, batch_size=4))
    expected: list[list[int]] = []
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        expected += [ids[i : i + seq_len] for i in range(0, len(ids) // seq_len * seq_len, seq_len)]
    assert rows == expected
    assert sum(row.count(tokenizer.bos_token_id) for row in rows) == 2  # once per file
    assert all(len(row) == seq_len for row in rows)


def test_no_bos_when_the_tokenizer_adds_none() -> None:
    plain = train_tiny_tokenizer(bos=False)
    ids = plain(SAMPLE_TEXT)["input_ids"]
    assert plain.bos_token_id not in ids
    rows = _rows(_reader(plain, [SAMPLE_TEXT], 16))
    assert _flat(rows) == ids[: len(ids) // 16 * 16]


def test_packed_text_survives_block_boundaries(tokenizer: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Read in small blocks (cut at line breaks), the windows still decode back to the text, in order."""
    monkeypatch.setattr(moe_inspect.io.corpus, "_TEXT_BLOCK", 37)
    text = SAMPLE_TEXT + "a line without a final newline that is longer than one block of text"
    reader = _reader(tokenizer, [text], 16, batch_size=2)
    batches = list(reader.batches())
    assert all(b.input_ids.shape[1] == 16 for b in batches)
    decoded = tokenizer.decode(torch.cat([b.input_ids for b in batches]).reshape(-1).tolist()[1:])
    assert text.startswith(decoded) and len(decoded) > len(text) - 40
    done = [b.bytes_done for b in batches]
    assert done == sorted(done) and done[-1] <= len(text)


def test_short_corpus_detected_before_streaming(tokenizer: Any) -> None:
    with pytest.raises(UserError, match="shorter than one window of 500 tokens"):
        _reader(tokenizer, ["hi there"], 500).check_long_enough()
    _reader(tokenizer, [SAMPLE_TEXT], 16).check_long_enough()
    with pytest.raises(UserError, match="no non-empty line"):
        _reader(tokenizer, ["\n  \n\n"], 16, lines=True).check_long_enough()


# ------------------------------------------------------------------------------------------------------
# --lines
# ------------------------------------------------------------------------------------------------------


def test_lines_tokenized_like_the_tokenizer_and_truncated(tokenizer: Any) -> None:
    seq_len = 10
    text = "\n".join(LINES[:3]) + "\n\n  \t\n" + "\n".join(LINES[3:]) + "\n"
    reader = _reader(tokenizer, [text], seq_len, batch_size=2, lines=True)
    rows = _rows(reader)
    expected = [tokenizer(line)["input_ids"][:seq_len] for line in LINES]
    assert rows == expected
    assert any(len(tokenizer(line)["input_ids"]) > seq_len for line in LINES)  # truncation really happened
    assert any(len(tokenizer(line)["input_ids"]) < seq_len for line in LINES)  # and padding too
    assert all(row[0] == tokenizer.bos_token_id for row in rows)
    first = next(reader.batches())
    assert first.input_ids.shape == (2, seq_len)
    assert tokenizer.pad_token_id in first.input_ids[first.attention_mask == 0].tolist()

    crlf = _rows(_reader(tokenizer, [text.replace("\n", "\r\n")], seq_len, lines=True))
    assert crlf == expected


def test_lines_from_several_files(tokenizer: Any, tmp_path: Path) -> None:
    a = tmp_path / "a.txt"
    b = tmp_path / "b.txt"
    a.write_text("\n".join(LINES[:2]), encoding="utf-8")  # no final newline
    b.write_text("\n".join(LINES[2:]) + "\n", encoding="utf-8")
    reader = CorpusReader(check_files([str(a), str(b)]), tokenizer, 64, 3, lines=True)
    assert _rows(reader) == [tokenizer(line)["input_ids"] for line in LINES]
    assert reader.total_bytes == a.stat().st_size + b.stat().st_size


# ------------------------------------------------------------------------------------------------------
# --max-tokens and laziness
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lines", [False, True], ids=["packed", "lines"])
def test_max_tokens_is_exact(tokenizer: Any, lines: bool) -> None:
    text = SAMPLE_TEXT * 2
    reader = _reader(tokenizer, [text], 16, batch_size=2, lines=lines, max_tokens=41)
    batches = list(reader.batches())
    assert sum(b.tokens for b in batches) == 41
    unlimited = _rows(_reader(tokenizer, [text], 16, batch_size=2, lines=lines))
    assert _flat(_rows(reader)) == _flat(unlimited)[:41]


class _CountingTokenizer:
    """Forwards to a tokenizer and records how many characters it was asked to tokenize."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.chars = 0

    def __call__(self, text: str, **kwargs: Any) -> Any:
        self.chars += len(text)
        return self.inner(text, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@pytest.mark.parametrize("lines", [False, True], ids=["packed", "lines"])
def test_batches_are_streamed_lazily(
    tokenizer: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, lines: bool
) -> None:
    monkeypatch.setattr(moe_inspect.io.corpus, "_TEXT_BLOCK", 500)
    path = tmp_path / "big.txt"
    path.write_text("".join(f"line {i} of a corpus that is much larger than one batch\n" for i in range(3000)))
    counting = _CountingTokenizer(tokenizer)
    reader = CorpusReader(check_files([str(path)]), counting, 16, 2, lines=lines)
    counting.chars = 0
    batches = reader.batches()
    assert inspect.isgenerator(batches)
    assert counting.chars == 0  # nothing read before the first batch is asked for
    first = next(batches)
    assert first.input_ids.shape[0] == 2
    assert 0 < counting.chars < 2_000  # a couple of blocks or lines, not the 170 kB file
    assert first.bytes_done < 2_000
    batches.close()


def test_unrouted_tail_is_counted_per_file(tokenizer: Any) -> None:
    """Each file's last partial window is not routed; the reader says how many tokens that left out."""
    texts = [SAMPLE_TEXT, SAMPLE_TEXT[:200]]
    reader = _reader(tokenizer, texts, seq_len=16)
    routed = sum(len(row) for row in _rows(reader))
    per_file = [len(tokenizer(t)["input_ids"]) for t in texts]  # BOS included once per stream
    assert routed == sum(n - n % 16 for n in per_file)
    assert reader.unrouted_tail_tokens == sum(n % 16 for n in per_file) > 0


@pytest.mark.parametrize("lines", [False, True])
def test_the_check_hands_its_stream_to_the_batches(tokenizer: Any, lines: bool) -> None:
    """check_long_enough then batches() tokenizes the first block once, and gives the same batches as without it."""
    text = SAMPLE_TEXT * 3 if not lines else "\n".join(LINES) + "\n"
    sources = [CorpusFile.from_text(text, "<t>")]
    plain = list(CorpusReader(sources, tokenizer, 16, 3, lines).batches())
    reader = CorpusReader(sources, tokenizer, 16, 3, lines)
    calls: list[int] = []
    original = tokenizer.__class__.__call__

    def counting(self: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return original(self, *args, **kwargs)

    tokenizer.__class__.__call__ = counting
    try:
        list(CorpusReader(sources, tokenizer, 16, 3, lines).batches())
        one_pass = len(calls)
        calls.clear()
        reader.check_long_enough()
        batches = list(reader.batches())
    finally:
        tokenizer.__class__.__call__ = original
    assert len(calls) == one_pass  # the check's tokenization is not repeated
    assert [b.input_ids.tolist() for b in batches] == [b.input_ids.tolist() for b in plain]
    again = next(iter(reader.batches()))  # a second pass starts anew
    assert again.input_ids.tolist() == plain[0].input_ids.tolist()


def test_stdin_handed_on_by_the_check_keeps_no_bytes(monkeypatch: pytest.MonkeyPatch, tokenizer: Any) -> None:
    """The run reads on from the check's stream, so standard input's peeked bytes are not kept for a replay."""
    data = (SAMPLE_TEXT * 200).encode("utf-8")
    monkeypatch.setattr(moe_inspect.io.corpus, "_BLOCK", 4096)
    monkeypatch.setattr(moe_inspect.io.corpus, "_TEXT_BLOCK", 1024)
    source = check_file_from(data, monkeypatch)
    assert source.stream is not None
    reader = CorpusReader([source], tokenizer, 16, 4)
    reader.check_long_enough()
    assert source.stream._kept  # the check's peek is kept until the run takes its stream over
    kept_during_run = []
    rows = []
    for batch in reader.batches():
        kept_during_run.append(sum(len(block) for block in source.stream._kept))
        rows += [ids[mask.bool()].tolist() for ids, mask in zip(batch.input_ids, batch.attention_mask, strict=True)]
    assert len(kept_during_run) > 10 and set(kept_during_run) == {0}  # nothing kept to the end of the pipe
    ids = tokenizer(SAMPLE_TEXT * 200)["input_ids"]
    assert [t for r in rows for t in r] == ids[: len(ids) // 16 * 16]
    assert source.describe() == {"path": "-", "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def test_stdin_is_replayed_when_the_run_cannot_use_the_checked_stream(
    monkeypatch: pytest.MonkeyPatch, tokenizer: Any
) -> None:
    """A run of another window length starts a second reader, which sees the peeked bytes first."""
    data = (SAMPLE_TEXT * 20).encode("utf-8")
    monkeypatch.setattr(moe_inspect.io.corpus, "_BLOCK", 4096)
    monkeypatch.setattr(moe_inspect.io.corpus, "_TEXT_BLOCK", 1024)
    reader = CorpusReader([check_file_from(data, monkeypatch)], tokenizer, 16, 4)
    reader.check_long_enough()
    reader.seq_len = 32
    ids = tokenizer(SAMPLE_TEXT * 20)["input_ids"]
    assert [t for r in _rows(reader) for t in r] == ids[: len(ids) // 32 * 32]
