"""Write serving-engine routing records exactly as the engines do (see the reference on serving engines).

A synthetic routing ``Routing`` (logical ids per token, dense layers, sequences, forward passes) is the ground
truth; the writers turn it into SGLang dumps (stat ring buffer, per_pass and per_token rank files with physical
ids and -1 padding, old CSVs) and vLLM/SGLang routed-experts arrays (npy, npz, JSONL base64).
"""

from __future__ import annotations

import base64
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


@dataclass
class Routing:
    ids: np.ndarray  # int64 [N, L, k] logical ids; dense layers -1
    sequence: np.ndarray  # [N] sequence (request) of each token, contiguous
    passes: np.ndarray  # [N] forward pass of each token
    num_experts: int
    dense: tuple[int, ...]

    @property
    def counts(self) -> np.ndarray:
        layers = self.ids.shape[1]
        out = np.zeros((layers, self.num_experts), dtype=np.int64)
        for layer in range(layers):
            valid = self.ids[:, layer][self.ids[:, layer] >= 0]
            out[layer] = np.bincount(valid, minlength=self.num_experts)
        return out


def make_routing(
    layers: int = 4,
    experts: int = 8,
    k: int = 2,
    dense: tuple[int, ...] = (0,),
    seq_lens: tuple[int, ...] = (5, 3, 7, 4),
    seqs_per_pass: int = 2,
    seed: int = 0,
    dead: int | None = None,
) -> Routing:
    """Skewed routing (expert e drawn with weight 1/(e+1)), ``dead`` never chosen, distinct ids per token."""
    rng = np.random.default_rng(seed)
    n = sum(seq_lens)
    p = 1.0 / np.arange(1, experts + 1)
    if dead is not None:
        p[dead] = 0
    p /= p.sum()
    ids = np.full((n, layers, k), -1, dtype=np.int64)
    for t in range(n):
        for layer in range(layers):
            if layer not in dense:
                ids[t, layer] = rng.choice(experts, size=k, replace=False, p=p)
    sequence = np.repeat(np.arange(len(seq_lens)), seq_lens)
    passes = sequence // seqs_per_pass
    return Routing(ids, sequence, passes, experts, tuple(dense))


def write_stat(path: Path, routing: Routing, buffer_size: int = 6) -> Path:
    """rank 0's stat dump: logical_count int32 [buffer, L, E], a ring indexed by pass % buffer (rows unordered)."""
    layers = routing.ids.shape[1]
    count = torch.zeros(buffer_size, layers, routing.num_experts, dtype=torch.int32)
    for t in range(len(routing.ids)):
        row = int(routing.passes[t]) % buffer_size
        for layer in range(layers):
            for e in routing.ids[t, layer]:
                if e >= 0:
                    count[row, layer, e] += 1
    torch.save({"rank": 0, "logical_count": count, "average_utilization_rate_over_window": None}, path)
    return path


def redundant_map(layers: int, experts: int, redundant: int) -> torch.Tensor:
    """[L, E + R]: slot s < E holds expert s, the extra slots replicate experts 1, 4, 7, ... (not s % E)."""
    row = torch.cat([torch.arange(experts), (torch.arange(redundant) * 3 + 1) % experts])
    return row.repeat(layers, 1).to(torch.int64)


def _physical(ids: np.ndarray, mapping: torch.Tensor, rng: np.random.Generator) -> np.ndarray:
    """Pick a random replica (physical slot) for every logical id; -1 stays -1."""
    m = mapping.numpy()
    out = np.full_like(ids, -1)
    for idx in zip(*np.nonzero(ids >= 0), strict=True):
        layer = idx[1]
        slots = np.flatnonzero(m[layer] == ids[idx])
        out[idx] = rng.choice(slots)
    return out


def write_rank_dumps(
    folder: Path, routing: Routing, mode: str, redundant: int = 2, ranks: int = 2, seed: int = 1
) -> list[Path]:
    """per_pass / per_token rank files: each pass's sequences are split over the ranks (data-parallel attention)."""
    rng = np.random.default_rng(seed)
    layers, k = routing.ids.shape[1:]
    mapping = redundant_map(layers, routing.num_experts, redundant)
    physical = _physical(routing.ids, mapping, rng)
    num_physical = mapping.shape[1]
    paths = []
    for rank in range(ranks):
        records = []
        for pid in np.unique(routing.passes):
            seqs = np.unique(routing.sequence[routing.passes == pid])[rank::ranks]
            rows = np.flatnonzero(np.isin(routing.sequence, seqs))
            record = {"forward_pass_id": int(pid), "rank": rank, "gatherer_key": "primary"}
            if mode == "per_pass":
                gpc = torch.zeros(layers, num_physical, dtype=torch.int32)
                for t in rows:
                    for layer in range(layers):
                        for s in physical[t, layer]:
                            if s >= 0:
                                gpc[layer, s] += 1
                record["global_physical_count"] = gpc
            else:
                slots = np.full((layers, len(rows), 8), -1, dtype=np.int32)  # top-k slots fixed at 8
                slots[:, :, :k] = physical[rows].transpose(1, 0, 2)
                record.update(
                    input_ids=[int(x) for x in rng.integers(0, 1000, len(rows))],
                    positions=list(range(len(rows))),
                    extend_seq_lens=[int((routing.sequence[rows] == s).sum()) for s in seqs],
                    forward_mode=1,
                    topk_ids_of_layer=torch.from_numpy(slots),
                    misc_objects=None,
                )
            records.append(record)
        path = folder / f"expert_distribution_recorder_1732500000_{rank}.pt"
        torch.save({"records": records, "last_physical_to_logical_map": mapping}, path)
        paths.append(path)
    return paths


def write_csvs(folder: Path, routing: Routing, ranks: int = 2) -> list[Path]:
    """Old SGLang: expert_distribution_rank{r}_timestamp{t}.csv with this rank's tokens."""
    paths = []
    for rank in range(ranks):
        part = Routing(routing.ids[rank::ranks], routing.sequence, routing.passes, routing.num_experts, routing.dense)
        counts = part.counts
        lines = ["layer_id,expert_id,count"]
        for layer, expert in zip(*np.nonzero(counts), strict=True):
            lines.append(f"{layer},{expert},{counts[layer, expert]}")
        path = folder / f"expert_distribution_rank{rank}_timestamp1732500000.csv"
        path.write_text("\n".join(lines) + "\n")
        paths.append(path)
    return paths


def request_arrays(routing: Routing, dense_fill: int = 0) -> list[np.ndarray]:
    """Routed experts per request, int32 [tokens, L, k]; dense layers hold ``dense_fill`` (engines keep zeros)."""
    ids = np.where(routing.ids >= 0, routing.ids, dense_fill).astype(np.int32)
    return [ids[routing.sequence == s] for s in np.unique(routing.sequence)]


def write_jsonl(path: Path, arrays: list[np.ndarray], raw: bool) -> Path:
    """One JSON object per request: SGLang's meta_info.routed_experts (raw int32) or vLLM's np.save bytes."""
    with open(path, "w") as handle:
        for array in arrays:
            if raw:
                payload = {"meta_info": {"routed_experts": base64.b64encode(array.astype("<i4").tobytes()).decode()}}
            else:
                buffer = io.BytesIO()
                np.save(buffer, array)
                payload = {"routed_experts": base64.b64encode(buffer.getvalue()).decode()}
            handle.write(json.dumps(payload) + "\n")
    return path
