"""One batch of a comparison, on the device: model A's pass into a record, and model B's pass compared against it.

Model B goes through the same rounding as A's record (ids int16, weights and probabilities float16), so identical
routing compares as identical. Per-router sums stay on the device until the report reads them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moe_inspect import metrics
from moe_inspect.analysis.compare_record import (
    OUTPUT_TOP,
    PROB_DTYPE,
    WEIGHT_DTYPE,
    BatchRecord,
    expert_dtype,
)
from moe_inspect.analysis.compare_report import SUMS
from moe_inspect.analysis.outputs import DecoderPass, OutputHead, logprobs_at, topk_logprobs
from moe_inspect.io.corpus import Batch
from moe_inspect.model.capture import RouterOutput
from moe_inspect.model.loading import LoadedModel
from moe_inspect.model.routers import RouterSpec


def _positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).clamp_min(0)


def decode(loaded: LoadedModel, head: OutputHead, input_ids: torch.Tensor, mask: torch.Tensor) -> DecoderPass:
    device = loaded.input_device
    return head.decode(
        input_ids.to(device, non_blocking=True).long(),
        mask.to(device, non_blocking=True).long(),
        _positions(mask.long()).to(device, non_blocking=True),
    )


def _real_rows(mask: torch.Tensor) -> torch.Tensor:
    """Flat indices of real tokens, computed on the host from the CPU mask (index_select then needs no sync)."""
    return mask.reshape(-1).nonzero().squeeze(-1)


class _RealRowsSink:
    """A capture sink's real-token rows: found once per batch on the host, copied once to each router's device."""

    def __init__(self) -> None:
        self.rows: dict[torch.device, torch.Tensor] = {}
        self.rows_cpu: torch.Tensor | None = None

    def _begin_rows(self, mask: torch.Tensor) -> torch.Tensor:
        self.rows_cpu = _real_rows(mask)
        self.rows = {}
        return self.rows_cpu

    def _rows_on(self, device: torch.device) -> torch.Tensor:
        if device not in self.rows:
            assert self.rows_cpu is not None
            self.rows[device] = self.rows_cpu.to(device, non_blocking=True)
        return self.rows[device]

    def _rounded(self, spec: RouterSpec, out: RouterOutput) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The real rows' experts, weights and routing probabilities, rounded as the record stores them."""
        rows = self._rows_on(out.experts.device)
        return (
            out.experts.index_select(0, rows).to(expert_dtype(spec)),
            out.weights.index_select(0, rows).to(WEIGHT_DTYPE),
            out.probabilities(spec).index_select(0, rows).to(PROB_DTYPE),
        )


class Recorder(_RealRowsSink):
    """Capture sink for model A: the record's per-router fields of the real rows, left on the device."""

    def __init__(self, routers: list[RouterSpec]) -> None:
        super().__init__()
        self.routers = routers
        self.fields: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def begin(self, mask: torch.Tensor) -> None:
        self._begin_rows(mask)
        self.fields = {}

    def __call__(self, spec: RouterSpec, out: RouterOutput) -> None:
        self.fields[spec.index] = self._rounded(spec, out)

    def record(self, batch: Batch, logp: torch.Tensor, ids: torch.Tensor, rest: torch.Tensor) -> BatchRecord:
        missing = [spec.path for spec in self.routers if spec.index not in self.fields]
        if missing:
            raise RuntimeError(f"routers did not fire: {', '.join(missing)}")
        fields = [self.fields[spec.index] for spec in self.routers]
        return BatchRecord(
            input_ids=batch.input_ids.to(torch.int32),
            attention_mask=batch.attention_mask.to(torch.int8),
            experts=[f[0] for f in fields],
            weights=[f[1] for f in fields],
            probs=[f[2] for f in fields],
            out_logp=logp.float(),
            out_ids=ids.to(torch.int32),
            out_rest=rest.float(),
        )


def run_a(loaded: LoadedModel, head: OutputHead, recorder: Recorder, batch: Batch) -> BatchRecord:
    recorder.begin(batch.attention_mask)
    decoded = decode(loaded, head, batch.input_ids, batch.attention_mask)
    logp, ids, rest, _ = topk_logprobs(head, decoded, OUTPUT_TOP)
    return recorder.record(batch, logp, ids, rest)


# ------------------------------------------------------------------------------------------------------------
# comparing model B against the record, on the device
# ------------------------------------------------------------------------------------------------------------


@dataclass
class _RouterSums:
    sums: torch.Tensor  # float64 [len(SUMS)]
    count_a: torch.Tensor  # int64 [C]
    count_b: torch.Tensor  # int64 [C]
    tokens: int = 0


class Comparer(_RealRowsSink):
    """Capture sink for model B: compares each router's output with A's record of the same batch."""

    def __init__(self, routers: list[RouterSpec], keep_b: bool = False) -> None:
        super().__init__()
        self.routers = routers
        self.keep_b = keep_b
        self.state: dict[int, _RouterSums] = {}
        self.record: BatchRecord | None = None
        self.tokens = 0
        self.b_experts: dict[int, torch.Tensor] = {}
        self.out_sums: torch.Tensor | None = None  # float64 [top-1 agreements, KL sum]
        self.positions = 0

    def begin(self, record: BatchRecord, device: torch.device) -> None:
        self.record = record.to(device)
        self.tokens = int(self._begin_rows(record.attention_mask).numel())
        self.b_experts = {}

    def __call__(self, spec: RouterSpec, out: RouterOutput) -> None:
        assert self.record is not None, "begin() must be called before the forward"
        device = out.experts.device
        i = spec.index
        exp_a = self.record.experts[i].to(device).long()
        w_a = self.record.weights[i].to(device)
        p_a = self.record.probs[i].to(device)
        # B goes through the same rounding as A's record, so identical routing compares as identical.
        exp_b, w_b, p_b = self._rounded(spec, out)
        exp_b = exp_b.long()
        state = self.state.get(i)
        if state is None:
            c = spec.num_columns
            state = self.state[i] = _RouterSums(
                torch.zeros(len(SUMS), dtype=torch.float64, device=device),
                torch.zeros(c, dtype=torch.int64, device=device),
                torch.zeros(c, dtype=torch.int64, device=device),
            )
        k = exp_a.shape[1]
        inter = metrics.set_intersection(exp_a, exp_b).double()
        exact = (inter == k).double()
        margin = metrics.kth_margin(p_a, spec.top_k).double()
        per_token = torch.stack(
            [
                (exp_a[:, 0] == exp_b[:, 0]).double(),
                inter / k,
                inter / (2 * k - inter),
                exact,
                metrics.weight_overlap(exp_a, w_a, exp_b, w_b).double(),
                metrics.js_divergence(p_a, p_b).double(),
                margin * (1 - exact),
                1 - exact,
                margin * exact,
            ]
        )
        state.sums += per_token.sum(-1)
        state.count_a += metrics.expert_counts(exp_a, spec.num_columns)
        state.count_b += metrics.expert_counts(exp_b, spec.num_columns)
        state.tokens += self.tokens
        if self.keep_b:
            self.b_experts[i] = exp_b

    def compare_outputs(self, head: OutputHead, decoded: DecoderPass) -> None:
        assert self.record is not None
        logp_b, rest_b, top_b = logprobs_at(head, decoded, self.record.out_ids.long())
        device = logp_b.device
        logp_a = self.record.out_logp.to(device)
        # A's most likely token is B's most likely too (ties count: bf16 logits tie often).
        agree = (logp_b[:, 0] >= top_b).double().sum()
        kl = metrics.topk_kl(logp_a, self.record.out_rest.to(device), logp_b, rest_b).sum()
        sums = torch.stack([agree, kl])
        self.out_sums = sums if self.out_sums is None else self.out_sums + sums.to(self.out_sums.device)
        self.positions += int(self.record.out_ids.shape[0])


def run_b(loaded: LoadedModel, head: OutputHead, comparer: Comparer, record: BatchRecord) -> None:
    comparer.begin(record, loaded.input_device)
    decoded = decode(loaded, head, record.input_ids, record.attention_mask)
    comparer.compare_outputs(head, decoded)
