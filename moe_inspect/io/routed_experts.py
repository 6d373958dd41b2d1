"""Routed-experts arrays (vLLM and SGLang routing replay): [tokens, num_hidden_layers, top_k] ids per request.

On disk as ``.npy``/``.npz`` (one array per request) or as JSON lines holding one base64 string per request:
``np.save`` bytes from vLLM's HTTP API, raw int32 bytes (no header, so the shape must be declared) from SGLang's
``meta_info.routed_experts``. Ids are indices only: no weights, no order guarantee within a token's k slots.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from moe_inspect.errors import UserError
from moe_inspect.io.engine_records import _NPY_MAGIC, EngineRecord, compact_topk, topk_counts


def _payload(obj: Any) -> Any:
    """The routed-experts value in one JSON line: the line itself, or its (meta_info.)routed_experts field."""
    if isinstance(obj, dict):
        for holder in (obj, obj.get("meta_info") or {}, obj.get("outputs") or {}):
            if isinstance(holder, dict) and "routed_experts" in holder:
                return holder["routed_experts"]
        strings = [v for v in obj.values() if isinstance(v, str)]
        if len(strings) == 1:
            return strings[0]
        return None
    return obj


def _lines(path: Path) -> list[Any]:
    values = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                value = _payload(json.loads(line))
            except json.JSONDecodeError:
                raise UserError(f"{path} line {number} is not JSON.") from None
            if value is None:
                raise UserError(f"{path} line {number} has no routed_experts value.")
            values.append(value)
    return values


def _b64(value: str, where: str) -> bytes:
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise UserError(f"{where} is not valid base64.") from None


def jsonl_format(path: Path) -> str:
    """'vllm-routed' when the first request decodes to ``np.save`` bytes, 'sglang-routed' for raw int32."""
    values = _lines(path)
    if not values:
        raise UserError(f"{path} holds no request.")
    first = values[0]
    if not isinstance(first, str):
        return "vllm-routed"  # a nested list of ids: self-describing like np.save bytes
    return "vllm-routed" if _b64(first, f"{path} line 1").startswith(_NPY_MAGIC) else "sglang-routed"


def _decode(value: Any, kind: str, layers: int | None, top_k: int | None, where: str) -> np.ndarray:
    if not isinstance(value, str):
        return np.asarray(value)
    raw = _b64(value, where)
    if kind == "vllm-routed":
        try:
            return np.load(io.BytesIO(raw), allow_pickle=False)
        except ValueError:
            raise UserError(f"{where} does not decode to np.save bytes.") from None
    if layers is None or top_k is None:
        raise UserError("Raw int32 routed experts (SGLang) carry no shape: declare `layers` and `top_k`.")
    if len(raw) % (4 * layers * top_k):
        raise UserError(f"{where} holds {len(raw)} bytes, not a whole number of [{layers}, {top_k}] int32 tokens.")
    return np.frombuffer(raw, dtype="<i4").reshape(-1, layers, top_k)


def _load_arrays(path: Path, kind: str, layers: int | None, top_k: int | None) -> list[np.ndarray]:
    if kind == "routed-experts":
        try:
            loaded = np.load(path, allow_pickle=False)
        except ValueError:
            raise UserError(f"{path} is not a .npy/.npz array file.") from None
        if isinstance(loaded, np.lib.npyio.NpzFile):
            with loaded:
                return [loaded[name] for name in loaded.files]
        return [loaded]
    return [_decode(v, kind, layers, top_k, f"{path} request {i + 1}") for i, v in enumerate(_lines(path))]


def read_routed_experts(
    files: list[Path], kind: str, layers: int | None, top_k: int | None, experts: int | None
) -> EngineRecord:
    """Per-request [tokens, L, k] ids -> one per-token record; each request is one sequence and one batch."""
    arrays: list[np.ndarray] = []
    for f in files:
        for array in _load_arrays(f, kind, layers, top_k):
            if array.ndim == 2 and layers is not None and top_k is not None and array.shape[1] == layers * top_k:
                array = array.reshape(-1, layers, top_k)
            if array.ndim != 3 or not np.issubdtype(array.dtype, np.integer):
                raise UserError(f"{f} holds a {array.dtype} array of shape {list(array.shape)}, not [tokens, L, k].")
            arrays.append(array.astype(np.int64))
    if not arrays:
        raise UserError("The routed-experts files hold no request.")
    shape = arrays[0].shape[1:]
    for array in arrays:
        if array.shape[1:] != shape:
            raise UserError(f"Requests disagree on [layers, top-k]: {list(shape)} and {list(array.shape[1:])}.")
    if layers is not None and shape[0] != layers:
        raise UserError(f"The arrays have {shape[0]} layers, not the {layers} declared.")
    if top_k is not None and shape[1] != top_k:
        raise UserError(f"The arrays choose {shape[1]} experts per token, not the {top_k} declared.")
    ids = np.concatenate(arrays)
    notes = []
    # A dense layer has no router; engines fill its slots with one constant (0 or -1), which top-k never produces.
    first = ids[:1, :, :1]
    dense = (ids == first).all(axis=(0, 2)) if len(ids) else np.zeros(shape[0], dtype=bool)
    if shape[1] > 1 and dense.any():
        ids[:, dense] = -1
        notes.append(f"layers {', '.join(map(str, np.flatnonzero(dense)))} hold one constant id: dense layers")
    topk = compact_topk(ids, "A routed-experts array")
    largest = int(topk.max())
    if experts is None:
        experts = largest + 1
        notes.append(f"experts = largest id + 1 = {experts} (declare the model's count to see dead experts at the end)")
    elif largest >= experts:
        raise UserError(f"The arrays use expert {largest}, but only {experts} experts were declared.")
    request = np.concatenate([np.full(len(a), i, dtype=np.int64) for i, a in enumerate(arrays)])
    counts = topk_counts(topk, request, len(arrays), experts)
    notes.append("ids are as the engine returned them: physical slots if EPLB placed redundant experts")
    return EngineRecord(
        kind,
        [str(f) for f in files],
        counts.sum(0),
        counts,
        "request",
        top_k=shape[1],
        topk=topk,
        sequence=request,
        notes=notes,
    )
