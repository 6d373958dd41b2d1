"""Which token ids each expert takes: per (MoE router, expert, token id) counts, any rank and first choice.

Memory bound. Token ids are remapped on the host (the corpus reader's ids are CPU tensors, so this costs
no device sync) to a compact index over the *distinct ids seen so far*, U <= vocabulary. Each counted
router keeps one int64 tensor of U_cap x C + 1 entries on its own device (C = routed + null experts),
packing the any-rank count in the low 32 bits and the first-choice count in the high 32 bits, so the
bound is 8 * U_cap * C bytes per router with U_cap = min(< 2 U, V) (capacity doubles as new ids appear,
up to the vocabulary V): for Mixtral's 32k vocabulary and 8 experts at most 2.0 MiB a layer, for
DeepSeek-V3 (129,280 ids, 256 experts) at most 253 MiB a layer (restrict ``layers`` there). Nothing grows
with the number of tokens, and growth is decided on the host, so a batch never waits for the device.

Batches are atomic, as in ``analysis.accumulate``: a router call only keeps the batch's bin keys (T x k int64,
one batch's worth per counted router), and ``end_batch`` scatters them into the counts once the forward
finished; ids first seen in a batch that never finished are forgotten again.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from moe_inspect import metrics
from moe_inspect.io import schemas
from moe_inspect.model.capture import RouterOutput, Sink
from moe_inspect.model.routers import RouterSpec

_FIRST = 1 << 32  # the first-choice count lives in the high 32 bits (a corpus stays below 4e9 tokens)
_LOW = _FIRST - 1


@dataclass
class TokenTotals:
    """Host copies for one router: rows are the distinct token ids seen, columns the C expert columns."""

    spec: RouterSpec
    token_ids: np.ndarray  # [U]
    any_rank: np.ndarray  # [U, C] assignments at any rank
    first: np.ndarray  # [U, C] first-choice assignments


class TokenCounter:
    """Capture sink counting token ids per expert; call ``begin_batch(input_ids, mask)`` before each forward."""

    INITIAL_ROWS = 256

    def __init__(
        self, routers: Sequence[RouterSpec], layers: Iterable[int] | None = None, vocab_size: int | None = None
    ) -> None:
        self.vocab_size = vocab_size
        wanted = None if layers is None else set(layers)
        self.routers = [r for r in routers if wanted is None or r.layer in wanted]
        self._indices = {r.index for r in self.routers}
        self._lookup = np.full(0, -1, dtype=np.int64)  # token id -> compact row, -1 unseen
        self._ids: list[int] = []  # compact row -> token id
        self._capacity = 0
        self._counts: dict[int, torch.Tensor] = {}
        self._rows_cpu: torch.Tensor | None = None
        self._rows: dict[torch.device, torch.Tensor] = {}
        self._pending: dict[int, list[torch.Tensor]] = {}  # this batch's bin keys per router, until end_batch
        self._committed_ids = 0  # ids seen in finished batches; later ones belong to the batch in flight

    def _grow_lookup(self, max_id: int) -> None:
        if max_id >= self._lookup.size:
            grown = np.full(max(max_id + 1, 2 * self._lookup.size), -1, dtype=np.int64)
            grown[: self._lookup.size] = self._lookup
            self._lookup = grown

    def begin_batch(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        """Remap the batch's (CPU) ids to compact rows, pads to -1; grows the device counters if needed."""
        self._rollback()
        ids = input_ids.reshape(-1).cpu().numpy().astype(np.int64)
        real = attention_mask.reshape(-1).cpu().numpy().astype(bool)
        self._grow_lookup(int(ids.max(initial=0)))
        fresh = np.unique(ids[real][self._lookup[ids[real]] < 0])
        self._lookup[fresh] = np.arange(len(self._ids), len(self._ids) + fresh.size)
        self._ids.extend(fresh.tolist())
        if len(self._ids) > self._capacity:
            grown = max(2 * self._capacity, self.INITIAL_ROWS)
            if self.vocab_size is not None:
                grown = min(grown, self.vocab_size)  # never more rows than ids exist
            self._resize(max(len(self._ids), grown))
        rows = np.where(real, self._lookup[ids], -1)
        self._rows_cpu = torch.from_numpy(rows)
        self._rows = {}

    def end_batch(self) -> None:
        """The forward finished: count its assignments (one scatter per router, no sync) and keep its new ids."""
        for index, keys in self._pending.items():
            counts = self._counts.get(index)
            if counts is None:
                size = self._capacity * self._columns(index) + 1
                counts = self._counts[index] = torch.zeros(size, dtype=torch.int64, device=keys[0].device)
            for key in keys:
                add = torch.ones_like(key)
                add[:, 0] += _FIRST
                counts.scatter_add_(0, key.reshape(-1), add.reshape(-1))
        self._pending = {}
        self._committed_ids = len(self._ids)

    def _rollback(self) -> None:
        """Forget what a batch left without ``end_batch`` staged: its keys and the ids it saw first."""
        self._pending = {}
        if len(self._ids) > self._committed_ids:
            self._lookup[self._ids[self._committed_ids :]] = -1
            del self._ids[self._committed_ids :]

    def _resize(self, capacity: int) -> None:
        """Rows are token-major, so growing appends zeros; the overflow bin (last entry) is reset."""
        for index, old in self._counts.items():
            columns = self._columns(index)
            new = torch.zeros(capacity * columns + 1, dtype=torch.int64, device=old.device)
            new[: self._capacity * columns] = old[: self._capacity * columns]
            self._counts[index] = new
        self._capacity = capacity

    def _columns(self, index: int) -> int:
        return next(r.num_columns for r in self.routers if r.index == index)

    def _rows_on(self, device: torch.device) -> torch.Tensor:
        rows = self._rows.get(device)
        if rows is None:
            assert self._rows_cpu is not None, "begin_batch() must be called before the forward"
            rows = self._rows[device] = self._rows_cpu.to(device, non_blocking=True)
        return rows

    def __call__(self, spec: RouterSpec, out: RouterOutput) -> None:
        if spec.index not in self._indices:
            return
        c = spec.num_columns
        rows = self._rows_on(out.experts.device)
        experts = out.experts.long()
        valid = (rows.unsqueeze(-1) >= 0) & (experts >= 0) & (experts < c)
        key = torch.where(valid, rows.unsqueeze(-1) * c + experts, self._capacity * c)
        self._pending.setdefault(spec.index, []).append(key)

    def finish(self) -> list[TokenTotals]:
        """One host copy per counted router, over the finished batches."""
        self._rollback()
        totals = []
        used = len(self._ids)
        ids = np.asarray(self._ids, dtype=np.int64)
        for spec in self.routers:
            counts = self._counts.get(spec.index)
            if counts is None:
                continue
            c = spec.num_columns
            packed = counts[: used * c].cpu().numpy().reshape(used, c)
            totals.append(TokenTotals(spec, ids, packed & _LOW, packed >> 32))
        return totals


def fan_out(*sinks: Sink | None) -> Sink:
    """One capture sink calling each given sink in turn (None entries skipped)."""
    active = [s for s in sinks if s is not None]
    if len(active) == 1:
        return active[0]

    def sink(spec: RouterSpec, out: RouterOutput) -> None:
        for each in active:
            each(spec, out)

    return sink


def vocab_specialization(t: TokenTotals, seed: int = 0) -> tuple[float, float]:
    """OLMoE's vocabulary specialisation of one router, and the same figure if first choices ignored the token.

    Per token id: the share of its occurrences whose first choice is its most frequent expert, averaged
    over ids weighted by occurrences. The random baseline draws each id's occurrences from the layer's own
    first-choice distribution (so rare ids, whose share is high by chance, and load imbalance both count).
    """
    occurrences = t.first.sum(1)
    seen = occurrences > 0
    if not seen.any():
        return math.nan, math.nan
    share = metrics.vocab_specialization(t.first[seen]).numpy()
    value = float(np.average(share, weights=occurrences[seen]))
    load = t.first.sum(0) / occurrences.sum()
    random = metrics.vocab_specialization_random(occurrences[seen], load, seed=seed)
    return value, random


def expert_tokens_frame(
    totals: Sequence[TokenTotals], decode: Callable[[int], str], top: int, min_count: int = 5
) -> pd.DataFrame:
    """The ``top`` most frequent and ``top`` highest-lift token ids (count >= ``min_count``) of each routed expert."""
    parts = []
    for t in totals:
        e = t.spec.num_experts
        occurrences = t.first.sum(1).astype(np.float64)  # every real token has exactly one first choice
        corpus_share = occurrences / max(occurrences.sum(), 1.0)
        for expert in range(e):
            count = t.any_rank[:, expert]
            total = count.sum()
            if total == 0:
                continue
            share = count / total
            lift = np.divide(share, corpus_share, out=np.zeros_like(share), where=corpus_share > 0)
            present = np.flatnonzero(count > 0)
            frequent = present[np.lexsort((t.token_ids[present], -count[present]))][:top]
            eligible = present[count[present] >= min_count]
            lifted = eligible[np.lexsort((t.token_ids[eligible], -count[eligible], -lift[eligible]))][:top]
            rows = list(dict.fromkeys([*frequent.tolist(), *lifted.tolist()]))
            in_frequent, in_lift = set(frequent.tolist()), set(lifted.tolist())
            parts.append(
                pd.DataFrame(
                    {
                        "layer": t.spec.layer,
                        "router": t.spec.kind,
                        "expert": expert,
                        "token_id": t.token_ids[rows],
                        "token": [decode(int(i)) for i in t.token_ids[rows]],
                        "count": count[rows],
                        "first_choice": t.first[rows, expert],
                        "share_of_expert": share[rows],
                        "lift": lift[rows],
                        "listed": [
                            "both" if r in in_frequent and r in in_lift else "frequent" if r in in_frequent else "lift"
                            for r in rows
                        ],
                    }
                )
            )
    names = schemas.EXPERT_TOKENS.names
    if not parts:
        return pd.DataFrame({n: [] for n in names}).astype(schemas.EXPERT_TOKENS.dtypes)
    return pd.concat(parts, ignore_index=True)[names].astype(schemas.EXPERT_TOKENS.dtypes)


def vocab_frame(totals: Sequence[TokenTotals]) -> pd.DataFrame:
    """layer, router, vocab_specialization, vocab_specialization_random: merged into layers.csv."""
    names = [c.name for c in schemas.VOCAB_SPECIALIZATION]
    rows = [(t.spec.layer, t.spec.kind, *vocab_specialization(t)) for t in totals]
    return pd.DataFrame(rows, columns=["layer", "router", *names]).astype({n: "float64" for n in names})
