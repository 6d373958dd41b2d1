"""Serving-engine routing records (SGLang's expert distribution recorder, SGLang/vLLM routed experts) as counts.

Every reader ends in one ``EngineRecord``: logical-expert counts per decoder layer (as the engine indexes layers,
dense ones included as all-zero rows), per-batch counts for capacity what-ifs, and, for per-token records, the
logical expert ids of every token. Formats are detected by content; unknown keys are ignored (forks add their own).
The formats are described in the README section "At serving scale".
"""

from __future__ import annotations

import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from moe_inspect.errors import UserError

COUNT_FORMATS = ("sglang-stat", "sglang-per-pass", "sglang-csv")
TOKEN_FORMATS = ("sglang-per-token", "routed-experts", "sglang-routed", "vllm-routed")
FORMATS = COUNT_FORMATS + TOKEN_FORMATS
_NPY_MAGIC = b"\x93NUMPY"


@dataclass
class EngineRecord:
    """What one or more record files say about routing, in logical expert ids."""

    format: str
    files: list[str]
    counts: np.ndarray  # int64 [L, E]: assignments per logical expert, every decoder layer
    batch_counts: np.ndarray | None = None  # int64 [B, L, E]: per forward pass (or request) for capacity what-ifs
    batch_unit: str | None = None  # what one row of batch_counts is: "forward pass" or "request"
    top_k: int | None = None
    topk: np.ndarray | None = None  # int64 [N, L, k] logical ids per token, -1 where a slot is unused
    sequence: np.ndarray | None = None  # int64 [N]: consecutive rows with equal ids are consecutive tokens
    physical_to_logical: np.ndarray | None = None  # [L, P] the engine's placement while recording
    notes: list[str] = field(default_factory=list)

    @property
    def num_layers(self) -> int:
        return int(self.counts.shape[0])

    @property
    def num_experts(self) -> int:
        return int(self.counts.shape[1])

    @property
    def dense_layers(self) -> list[int]:
        """Layers with no routed assignment at all: dense layers (or MoE layers the record never filled)."""
        return [int(i) for i in np.flatnonzero(self.counts.sum(1) == 0)]

    @property
    def per_token(self) -> bool:
        return self.topk is not None


def _torch_load(path: Path) -> Any:
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any unreadable file is the user's input problem
        raise UserError(f"{path} could not be read as a torch.save record ({type(exc).__name__}).") from None


def _numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def detect_format(path: Path) -> str:
    """The record format of ``path`` from its content (magic bytes, CSV header, JSON lines or dict keys)."""
    with open(path, "rb") as handle:
        head = handle.read(64)
    if head.startswith(_NPY_MAGIC):
        return "routed-experts"
    if head.startswith(b"PK"):
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
        if names and all(n.endswith(".npy") for n in names):
            return "routed-experts"
        return _torch_format(path, _torch_load(path))
    text = head.lstrip().decode("utf-8", errors="replace")
    if text.startswith("layer_id"):
        return "sglang-csv"
    if text.startswith(("{", '"', "[")):
        from moe_inspect.io.routed_experts import jsonl_format

        return jsonl_format(path)
    return _torch_format(path, _torch_load(path))


def _torch_format(path: Path, obj: Any) -> str:
    if isinstance(obj, dict) and "logical_count" in obj:
        return "sglang-stat"
    if isinstance(obj, dict) and "records" in obj and "last_physical_to_logical_map" in obj:
        records = obj["records"]
        if records and "topk_ids_of_layer" in records[0]:
            return "sglang-per-token"
        return "sglang-per-pass"
    raise UserError(f"{path} is not an SGLang expert-distribution dump, a routed-experts array or an old CSV.")


def read_records(
    paths: Sequence[str | Path],
    format: str = "auto",
    layers: int | None = None,
    top_k: int | None = None,
    experts: int | None = None,
) -> EngineRecord:
    """Read and combine record files of one format (several rank files, several dumps or requests).

    ``layers``/``top_k`` shape raw int32 routed-experts bytes and are checked against every other shape;
    ``experts`` sets E where only ids are recorded (otherwise the largest id + 1, which hides dead experts).
    """
    files = [Path(p) for p in paths]
    if not files:
        raise UserError("No record file was given.")
    for f in files:
        if not f.is_file():
            raise UserError(f"Record {f} does not exist or is not a file.")
    if format != "auto" and format not in FORMATS:
        raise UserError(f"Unknown record format {format!r}; expected auto or one of {', '.join(FORMATS)}.")
    found = {f: (format if format != "auto" else detect_format(f)) for f in files}
    kinds = sorted(set(found.values()))
    if len(kinds) > 1:
        raise UserError(f"The records mix formats ({', '.join(kinds)}); ingest one format at a time.")
    kind = kinds[0]
    if kind in ("routed-experts", "sglang-routed", "vllm-routed"):
        from moe_inspect.io.routed_experts import read_routed_experts

        record = read_routed_experts(files, kind, layers, top_k, experts)
    elif kind == "sglang-stat":
        record = _read_stat(files)
    elif kind == "sglang-per-pass":
        record = _read_per_pass(files)
    elif kind == "sglang-per-token":
        record = _read_per_token(files)
    else:
        record = _read_csv(files)
    if layers is not None and record.num_layers != layers:
        raise UserError(f"The record has {record.num_layers} layers, not the {layers} declared.")
    if experts is not None and record.num_experts != experts:
        raise UserError(f"The record has {record.num_experts} experts per layer, not the {experts} declared.")
    if top_k is not None:
        if record.top_k is not None and record.top_k != top_k:
            raise UserError(f"The record chooses {record.top_k} experts per token, not the {top_k} declared.")
        bad = [i for i, total in enumerate(record.counts.sum(1)) if total % top_k]
        if bad:
            raise UserError(f"Layer {bad[0]}'s assignment count is not a multiple of the declared top-k {top_k}.")
        record.top_k = top_k
    if not record.counts.any():
        raise UserError("The records hold no routed assignment in any layer (an empty or never-started recording).")
    return record


def _read_stat(files: list[Path]) -> EngineRecord:
    """``stat``/``stat_approx``: ``logical_count`` [buffer, L, E] (or [L, E]); the ring's unfilled rows are zero."""
    rows = []
    for f in files:
        obj = _torch_load(f)
        if not isinstance(obj, dict) or "logical_count" not in obj:
            raise UserError(f"{f} has no logical_count: it is not an SGLang stat dump.")
        count = _numpy(obj["logical_count"]).astype(np.int64)
        if count.ndim == 2:
            count = count[None]
        if count.ndim != 3:
            raise UserError(f"{f}: logical_count has shape {list(count.shape)}, expected [buffer, layers, experts].")
        if (count < 0).any():
            raise UserError(f"{f}: logical_count holds negative counts.")
        if rows and count.shape[1:] != rows[0].shape[1:]:
            raise UserError(
                f"{f} counts {list(count.shape[1:])} layers x experts, the first dump {list(rows[0].shape[1:])}."
            )
        rows.append(count)
    stacked = np.concatenate(rows)
    filled = stacked[stacked.reshape(len(stacked), -1).any(1)]  # ring buffer: drop rows never written
    notes = ["stat dumps count logical experts per forward pass; the ring buffer's unfilled rows were skipped"]
    return EngineRecord("sglang-stat", [str(f) for f in files], stacked.sum(0), filled, "forward pass", notes=notes)


def _rank_dumps(files: list[Path]) -> tuple[np.ndarray, list[dict]]:
    """The shared physical->logical map and every rank's records; rank files must agree on the map."""
    mapping: np.ndarray | None = None
    records: list[dict] = []
    for f in files:
        obj = _torch_load(f)
        if not isinstance(obj, dict) or "records" not in obj or "last_physical_to_logical_map" not in obj:
            raise UserError(f"{f} is not an SGLang per_pass/per_token dump (records, last_physical_to_logical_map).")
        m = _numpy(obj["last_physical_to_logical_map"]).astype(np.int64)
        if m.ndim != 2 or (m < 0).any():
            raise UserError(f"{f}: last_physical_to_logical_map must be [layers, physical experts] of expert ids.")
        if mapping is not None and (m.shape != mapping.shape or (m != mapping).any()):
            raise UserError(f"{f} maps physical experts to logical ones differently from the other rank files.")
        mapping = m
        records.extend(obj["records"])
    assert mapping is not None
    return mapping, records


def _to_logical(physical_counts: np.ndarray, mapping: np.ndarray, num_experts: int) -> np.ndarray:
    """Sum [..., L, P] physical-slot counts into [..., L, E] logical experts through ``mapping`` [L, P]."""
    layers, _ = mapping.shape
    lead = physical_counts.shape[:-2]
    flat = physical_counts.reshape(-1, *mapping.shape)
    key = (np.arange(layers)[:, None] * num_experts + mapping).reshape(-1)
    out = np.zeros((flat.shape[0], layers * num_experts), dtype=np.int64)
    for i in range(flat.shape[0]):
        out[i] = np.bincount(key, weights=flat[i].reshape(-1), minlength=layers * num_experts)
    return out.reshape(*lead, layers, num_experts)


def _map_note(mapping: np.ndarray, num_experts: int) -> list[str]:
    notes = ["physical expert ids were mapped to logical ids with last_physical_to_logical_map"]
    if mapping.shape[1] > num_experts:
        notes.append(
            f"{mapping.shape[1] - num_experts} redundant physical slots per layer; if EPLB rebalanced during the "
            "recording, passes before the last rebalance used another map"
        )
    return notes


def _read_per_pass(files: list[Path]) -> EngineRecord:
    """``per_pass``: each rank's ``global_physical_count`` [L, P] per forward pass; ranks' shares are summed."""
    mapping, records = _rank_dumps(files)
    num_experts = int(mapping.max()) + 1
    passes: dict[Any, np.ndarray] = {}
    for rec in records:
        if "global_physical_count" not in rec:
            raise UserError("A per_pass record has no global_physical_count.")
        count = _numpy(rec["global_physical_count"]).astype(np.int64)
        if count.shape != mapping.shape:
            raise UserError(
                f"A per_pass record counts {list(count.shape)} layers x physical experts, but the map is "
                f"{list(mapping.shape)}."
            )
        key = rec.get("forward_pass_id", len(passes))
        passes[key] = passes.get(key, 0) + count
    if not passes:
        raise UserError("The per_pass dumps hold no record.")
    physical = np.stack([passes[k] for k in sorted(passes, key=str)])
    batch = _to_logical(physical, mapping, num_experts)
    return EngineRecord(
        "sglang-per-pass",
        [str(f) for f in files],
        batch.sum(0),
        batch,
        "forward pass",
        physical_to_logical=mapping,
        notes=_map_note(mapping, num_experts),
    )


def compact_topk(ids: np.ndarray, what: str) -> np.ndarray:
    """[N, L, slots] ids with -1 in unused slots -> [N, L, k], valid ids first; repeated ids refuse the record."""
    if ids.size and int(ids.min()) < -1:
        raise UserError(f"{what} holds expert ids below -1.")
    ordered = -np.sort(-ids, axis=-1)  # descending: every -1 goes last
    if ordered.shape[-1] > 1:
        repeated = (ordered[..., 1:] == ordered[..., :-1]) & (ordered[..., 1:] >= 0)
        if repeated.any():
            raise UserError(f"{what} routes a token to the same expert twice in one layer, which top-k cannot do.")
    k = int((ordered >= 0).sum(-1).max()) if ordered.size else 0
    return ordered[..., : max(k, 1)]


def topk_counts(topk: np.ndarray, batch: np.ndarray, num_batches: int, num_experts: int) -> np.ndarray:
    """int64 [B, L, E] from [N, L, k] logical ids (-1 ignored) and each token's batch index [N]."""
    layers = topk.shape[1]
    valid = topk >= 0
    key = (batch[:, None, None] * layers + np.arange(layers)[None, :, None]) * num_experts + topk
    counts = np.bincount(key[valid].reshape(-1), minlength=num_batches * layers * num_experts)
    return counts.astype(np.int64).reshape(num_batches, layers, num_experts)


def _read_per_token(files: list[Path]) -> EngineRecord:
    """``per_token``: ``topk_ids_of_layer`` [L, tokens, 8] physical ids per record, -1 in unused slots."""
    mapping, records = _rank_dumps(files)
    layers, num_physical = mapping.shape
    num_experts = int(mapping.max()) + 1
    seen: dict[Any, list[np.ndarray]] = {}
    parts, seqs, batches = [], [], []
    pass_index: dict[Any, int] = {}
    next_seq = 0
    duplicates = 0
    for rec in records:
        ids = _numpy(rec["topk_ids_of_layer"]).astype(np.int64)
        tokens = len(rec["input_ids"]) if rec.get("input_ids") is not None else (ids.shape[1] if ids.ndim == 3 else 0)
        if ids.ndim != 3 or ids.shape[0] != layers or ids.shape[1] != tokens:
            raise UserError(
                f"A per_token record's topk_ids_of_layer is {list(ids.shape)}, expected [{layers}, {tokens}, slots] "
                "for its map and input_ids."
            )
        if ids.size and int(ids.max()) >= num_physical:
            raise UserError(f"A per_token record uses physical expert {int(ids.max())} of {num_physical}.")
        pid = rec.get("forward_pass_id")
        if any(ids.shape == prev.shape and (ids == prev).all() for prev in seen.get(pid, [])):
            duplicates += 1  # tensor-parallel ranks route the same tokens: count them once
            continue
        seen.setdefault(pid, []).append(ids)
        logical = np.where(ids >= 0, mapping[np.arange(layers)[:, None, None], ids.clip(min=0)], -1)
        parts.append(logical.transpose(1, 0, 2))
        lens = rec.get("extend_seq_lens")
        lens = [int(x) for x in lens] if lens else [1] * tokens  # decode passes: one token per request
        if sum(lens) != tokens:
            raise UserError(f"A per_token record's extend_seq_lens sum to {sum(lens)}, not its {tokens} tokens.")
        seqs.append(next_seq + np.repeat(np.arange(len(lens)), lens))
        next_seq += len(lens)
        batches.append(np.full(tokens, pass_index.setdefault(pid, len(pass_index)), dtype=np.int64))
    topk = compact_topk(np.concatenate(parts), "A per_token record")
    batch = np.concatenate(batches)
    counts = topk_counts(topk, batch, len(pass_index), num_experts)
    notes = _map_note(mapping, num_experts)
    notes.append("consecutive-token pairs are taken within prefill sequences only (decode passes hold one token each)")
    if duplicates:
        notes.append(f"{duplicates} records repeated another rank's tokens (tensor parallel) and were counted once")
    return EngineRecord(
        "sglang-per-token",
        [str(f) for f in files],
        counts.sum(0),
        counts,
        "forward pass",
        top_k=topk.shape[-1],
        topk=topk,
        sequence=np.concatenate(seqs),
        physical_to_logical=mapping,
        notes=notes,
    )


def _read_csv(files: list[Path]) -> EngineRecord:
    """Older SGLang: one ``layer_id,expert_id,count`` CSV per rank; ranks' counts are summed."""
    import pandas as pd

    frames = []
    for f in files:
        try:
            frame = pd.read_csv(f)
        except Exception as exc:
            raise UserError(f"{f} could not be read as CSV ({type(exc).__name__}).") from None
        if not {"layer_id", "expert_id", "count"} <= set(frame.columns):
            raise UserError(f"{f} lacks the layer_id, expert_id and count columns of SGLang's expert CSV.")
        if (frame[["layer_id", "expert_id", "count"]] < 0).any().any():
            raise UserError(f"{f} holds negative layer ids, expert ids or counts.")
        frames.append(frame[["layer_id", "expert_id", "count"]].astype("int64"))
    layers = max(int(f["layer_id"].max()) for f in frames) + 1
    experts = max(int(f["expert_id"].max()) for f in frames) + 1
    grids = []
    for frame in frames:
        grid = np.zeros((layers, experts), dtype=np.int64)
        np.add.at(grid, (frame["layer_id"].to_numpy(), frame["expert_id"].to_numpy()), frame["count"].to_numpy())
        grids.append(grid)
    notes = ["experts = largest expert id + 1 in the CSVs; layers = largest layer id + 1"]
    if len(grids) > 1 and all((g == grids[0]).all() for g in grids):
        notes.append("every rank file holds the same counts (tensor parallel): counted once")
        grids = grids[:1]
    return EngineRecord("sglang-csv", [str(f) for f in files], np.sum(grids, axis=0), notes=notes)
