"""Data-parallel ``balance`` under torchrun / accelerate launch: shard the batches, reduce the sums once.

Every rank reads the same corpus and keeps batches ``rank, rank + W, ...``, so each batch is routed by exactly
one rank with the same composition as in a single process: per-batch figures (capacity drops, repeats within a
sequence) and counts come out exactly equal, float sums to rounding. At the end each rank's accumulator is
flattened into one int64 and one float64 buffer and all-reduced once (gloo on CPU, nccl on GPU). Outside
torchrun (``WORLD_SIZE`` unset or 1) every function here is a no-op.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Iterable, Iterator
from typing import TypeVar

import torch
import torch.distributed as dist

from moe_inspect.analysis.accumulate import BalanceAccumulator, _RouterState

T = TypeVar("T")


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def enabled() -> bool:
    """True under a launcher with more than one process."""
    return world_size() > 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    """The rank that shows progress and writes files (rank 0; the only one outside a launcher)."""
    return rank() == 0


def setup() -> None:
    """Join the launcher's process group once: nccl with this rank's GPU selected (one GPU per local rank),
    else gloo.

    Call it before loading the model so that ``--device cuda`` lands on the rank's own GPU.
    """
    if not enabled() or dist.is_initialized():
        return
    # nccl needs a GPU per local rank; every rank of a node reaches the same answer, so backends never mix
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if torch.cuda.is_available() and local_world <= torch.cuda.device_count():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")
    atexit.register(_teardown)


def _teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def shard(items: Iterable[T]) -> Iterator[T]:
    """This rank's share: items ``rank, rank + W, ...`` (all of them in one process)."""
    if not enabled():
        yield from items
        return
    setup()
    me, world = dist.get_rank(), dist.get_world_size()
    for i, item in enumerate(items):
        if i % world == me:
            yield item


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def _state_tensors(state: _RouterState) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    ints = [state.count, state.first, state.coact, state.repeats, state.dropped]
    if state.capacity_dropped is not None:
        ints.append(state.capacity_dropped)
    floats = [state.prob_sum, state.weight_sum, state.scalars]
    if state.aux_count is not None:
        floats += [state.aux_count, state.aux_prob]  # type: ignore[list-item]
    return ints, floats


def _all_reduce(tensors: list[torch.Tensor], dtype: torch.dtype, device: torch.device) -> list[torch.Tensor]:
    """Sum ``tensors`` over ranks in one collective; returns the summed pieces (on ``device``)."""
    flat = torch.cat([t.reshape(-1).to(device=device, dtype=dtype) for t in tensors])
    dist.all_reduce(flat)
    return list(flat.split([t.numel() for t in tensors]))


def reduce_accumulator(accumulator: BalanceAccumulator, tokens: int) -> int:
    """Sum every rank's accumulator into every rank's (in place) and return the summed token count.

    A rank that routed no batch has no state yet: it first learns from the others which routers ran and how
    wide their logits were, and contributes zeros.
    """
    if not (enabled() and dist.is_initialized()):
        return tokens
    with torch.inference_mode():  # the sums are inference tensors: update them in the mode they were made in
        return _reduce(accumulator, tokens)


def _reduce(accumulator: BalanceAccumulator, tokens: int) -> int:
    device = _comm_device()
    routers = accumulator.routers
    meta = torch.zeros(len(routers), 2, dtype=torch.int64)
    for i, spec in enumerate(routers):
        state = accumulator._states.get(spec.index)
        if state is not None:
            meta[i, 0] = 1
            meta[i, 1] = 0 if state.aux_count is None else state.aux_count.numel()
    meta = meta.to(device)
    dist.all_reduce(meta, op=dist.ReduceOp.MAX)
    meta = meta.cpu()
    ints: list[torch.Tensor] = [torch.tensor([tokens, accumulator.batches], dtype=torch.int64)]
    floats: list[torch.Tensor] = []
    slots: list[tuple[_RouterState, int, int]] = []
    for i, spec in enumerate(routers):
        if not meta[i, 0]:
            continue
        state = accumulator._states.get(spec.index)
        if state is None:
            state = _RouterState(spec, accumulator.capacity_factors, device)
            accumulator._states[spec.index] = state
        if state.aux_count is None and meta[i, 1]:
            state.aux_count = torch.zeros(int(meta[i, 1]), dtype=torch.float64, device=state.count.device)
            state.aux_prob = torch.zeros_like(state.aux_count)
        state_ints, state_floats = _state_tensors(state)
        ints += [*state_ints, torch.tensor([state.tokens], dtype=torch.int64)]
        floats += state_floats
        slots.append((state, len(state_ints) + 1, len(state_floats)))
    summed_ints = iter(_all_reduce(ints, torch.int64, device))
    summed_floats = iter(_all_reduce(floats, torch.float64, device)) if floats else iter(())
    head = next(summed_ints).tolist()
    accumulator.batches = int(head[1])
    for state, n_ints, n_floats in slots:
        state_ints, state_floats = _state_tensors(state)
        for target in state_ints:
            target.copy_(next(summed_ints).view_as(target))
        state.tokens = int(next(summed_ints))
        for target in state_floats:
            target.copy_(next(summed_floats).view_as(target))
        assert len(state_ints) + 1 == n_ints and len(state_floats) == n_floats
    return int(head[0])


def sum_over_ranks(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Any tensors summed over ranks: integers exactly (as int64), the rest as float64, one collective for each.

    Returns new tensors in the given shapes, dtypes and devices; outside a launcher, the tensors themselves.
    """
    if not (enabled() and dist.is_initialized()):
        return tensors
    device = _comm_device()
    exact = [i for i, t in enumerate(tensors) if not (t.is_floating_point() or t.is_complex())]
    inexact = [i for i, t in enumerate(tensors) if i not in set(exact)]
    out: list[torch.Tensor] = list(tensors)
    for group, dtype in ((exact, torch.int64), (inexact, torch.float64)):
        if group:
            summed = _all_reduce([tensors[i] for i in group], dtype, device)
            for i, piece in zip(group, summed, strict=True):
                out[i] = piece.view_as(tensors[i]).to(device=tensors[i].device, dtype=tensors[i].dtype)
    return out
