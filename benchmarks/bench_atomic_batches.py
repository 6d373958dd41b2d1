"""Benchmark the cost of atomic batches in `balance`: the capture sinks of an older checkout, which add into
their totals inside each router call, against this tree's, which stage a batch's sums and commit them in
``end_batch``, on the same captured router outputs of the demo model (batch 8 x 256).

Both sinks run in one process, interleaved over rounds, timed in this process's CPU time (one intra-op thread),
which other jobs on a shared machine disturb far less than wall-clock time. The older modules are loaded from
``--old`` (a checkout or `git archive` of a commit before the change, e.g. ee04945) under other names; they
use this tree's metrics, which the change did not touch.

    git archive ee04945 | tar -x -C /tmp/old && python benchmarks/bench_atomic_batches.py --old /tmp/old
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import time
from pathlib import Path
from types import ModuleType

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

import moe_inspect
from moe_inspect.analysis import accumulate, token_counts
from moe_inspect.model.capture import capture

ROOT = Path(__file__).resolve().parent.parent


def _load(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--old", type=Path, required=True, help="checkout of a commit before the change")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--reps", type=int, default=50, help="batches per round and variant")
    args = parser.parse_args()
    torch.set_num_threads(1)
    old_acc = _load("old_accumulate", args.old / "moe_inspect/analysis/accumulate.py")
    old_tc = _load("old_token_counts", args.old / "moe_inspect/analysis/token_counts.py")
    insp = moe_inspect.load()
    routers = insp.loaded.routers
    text = (ROOT / "fixtures" / "heldout" / "mixed.txt").read_text(encoding="utf-8")
    batch = next(insp.corpus(text, seq_len=256, batch_size=8).batches())
    with torch.inference_mode(), capture(routers) as cap:
        insp.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    outs = [calls[0] for calls in cap.calls]
    vocab = len(insp.loaded.tokenizer)

    def per_batch_ms(acc_mod: ModuleType, tc_mod: ModuleType, commit: bool) -> tuple[float, float]:
        acc, counter = acc_mod.BalanceAccumulator(routers), tc_mod.TokenCounter(routers, None, vocab)
        with torch.inference_mode():
            start = time.process_time()
            for _ in range(args.reps):
                acc.begin_batch(batch.attention_mask)
                for spec, out in zip(routers, outs, strict=True):
                    acc(spec, out)
                if commit:
                    acc.end_batch()
            middle = time.process_time()
            for _ in range(args.reps):
                counter.begin_batch(batch.input_ids, batch.attention_mask)
                for spec, out in zip(routers, outs, strict=True):
                    counter(spec, out)
                if commit:
                    counter.end_batch()
            end = time.process_time()
        return (middle - start) / args.reps * 1e3, (end - middle) / args.reps * 1e3

    times: dict[str, list[tuple[float, float]]] = {"old (add in the router call)": [], "new (commit at batch end)": []}
    for _ in range(args.rounds):
        times["old (add in the router call)"].append(per_batch_ms(old_acc, old_tc, commit=False))
        times["new (commit at batch end)"].append(per_batch_ms(accumulate, token_counts, commit=True))
    with torch.inference_mode():
        start = time.process_time()
        for _ in range(10):
            insp.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        forward = (time.process_time() - start) / 10 * 1e3
    print(f"demo model, batch 8 x 256 ({batch.tokens} tokens), {len(routers)} routers; "
          f"forward {forward:.1f} ms CPU; medians of {args.rounds} rounds x {args.reps} batches")
    for name, rows in times.items():
        acc_ms = statistics.median(r[0] for r in rows)
        tc_ms = statistics.median(r[1] for r in rows)
        print(f"{name}: accumulator {acc_ms:.3f} ms/batch ({acc_ms / forward:.1%} of a forward), "
              f"token counter {tc_ms:.3f} ms/batch ({tc_ms / forward:.1%})")


if __name__ == "__main__":
    main()
