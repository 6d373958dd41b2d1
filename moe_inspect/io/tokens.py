"""The exact bytes of each token, so tokens that are partial UTF-8 sequences stay distinguishable.

Byte-level BPE tokenizers (GPT-2 style: Qwen, DeepSeek, GPT-OSS, Llama-3) split CJK characters and emoji
into tokens holding one or two bytes of a character; decoded alone, every one of them is the same "\ufffd".
Their bytes come from the token's vocabulary string through the byte-level alphabet, or from SentencePiece
byte-fallback pieces ("<0xE6>").
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's printable stand-in character for each byte (the map byte-level BPE vocabularies are written in)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


_CHAR_TO_BYTE = _byte_level_alphabet()


def _piece_bytes(piece: str) -> bytes | None:
    """A vocabulary piece as bytes, where the piece spells bytes (byte-fallback or byte-level); else None."""
    match = _BYTE_PIECE.fullmatch(piece)
    if match:
        return bytes([int(match.group(1), 16)])
    if piece and all(ch in _CHAR_TO_BYTE for ch in piece):
        return bytes(_CHAR_TO_BYTE[ch] for ch in piece)
    return None


def token_bytes(tokenizer: Any, ids: Sequence[int], decoded: Sequence[str]) -> list[bytes]:
    """The bytes of each token: its decoded text's UTF-8, unless decoding lost bytes to U+FFFD."""
    pieces = tokenizer.convert_ids_to_tokens(list(ids))
    out = []
    for text, piece in zip(decoded, pieces, strict=True):
        raw = _piece_bytes(piece) if "\ufffd" in text and isinstance(piece, str) else None
        out.append(raw if raw is not None else text.encode("utf-8"))
    return out


def hex_label(raw: bytes) -> str:
    """``<E6 9D>``: bytes as text that no CSV reader mistakes for a number."""
    return "<" + " ".join(f"{b:02X}" for b in raw) + ">"


def label_bytes(label: str) -> bytes:
    """The bytes a ``hex_label`` names."""
    return bytes.fromhex(label.strip("<>"))


def byte_label(raw: bytes) -> str | None:
    """``hex_label`` for bytes that are not whole UTF-8 characters; None when they decode (show the text)."""
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return hex_label(raw)
    return None
