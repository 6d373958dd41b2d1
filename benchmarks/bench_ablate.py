"""Benchmark `ablate`: one setting's pass relative to one bare forward pass over the same batches, and the cost
of `--importance` for one layer of the demo model.

Variants run interleaved over the same batches, round after round, so machine noise hits them alike:
the bare forward (``model(...)``, full logits, no hooks), ablate's baseline pass (decoder once, loss from the
chunked head) and one pass under each setting (router hooks + re-selection, same loss path). Reported as
median ratios over rounds. Times are this process's CPU time (one intra-op thread), which a machine
shared with other jobs disturbs far less than wall-clock time. Then a full
``Inspector.ablate(importance=True, layers=[L])`` is timed against the bare forward over the same corpus.

    python benchmarks/bench_ablate.py --rounds 5 --max-tokens 8192
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

import moe_inspect
from moe_inspect.analysis.ablate import num_layers
from moe_inspect.analysis.interventions import Rerouter, capacity_change, removal_change, top_k_change
from moe_inspect.analysis.outputs import OutputHead, token_losses

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=8192)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--importance-layer", type=int, default=2)
    parser.add_argument("--corpus", default=str(ROOT / "fixtures/heldout/mixed.txt"))
    args = parser.parse_args()

    insp = moe_inspect.load(dtype=args.dtype, device="cpu")
    model, routers = insp.model, insp.loaded.routers
    reader = insp.corpus(files=[args.corpus], seq_len=args.seq_len, batch_size=args.batch_size,
                         max_tokens=args.max_tokens)
    batches = list(reader.batches())
    head = OutputHead(model)
    count = num_layers(model)
    settings = {
        "top-k=1": top_k_change(1, routers),
        "capacity-factor=1.0": capacity_change(1.0),
        "drop-experts=*:3": removal_change("*:3", routers, count),
    }

    def bare() -> None:
        for b in batches:
            pos = (b.attention_mask.cumsum(-1) - 1).clamp_min(0)
            model(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=pos, use_cache=False)

    def baseline() -> None:
        for b in batches:
            pos = (b.attention_mask.cumsum(-1) - 1).clamp_min(0)
            token_losses(head, head.decode(b.input_ids, b.attention_mask, pos))

    def setting(name: str):
        rerouter = Rerouter(routers, settings[name])

        def run() -> None:
            for b in batches:
                pos = (b.attention_mask.cumsum(-1) - 1).clamp_min(0)
                rerouter.begin_batch(b.attention_mask)
                with rerouter.active():
                    token_losses(head, head.decode(b.input_ids, b.attention_mask, pos))
                rerouter.end_batch()

        return run

    variants = {"bare forward": bare, "ablate baseline pass": baseline}
    variants.update({f"setting {name}": setting(name) for name in settings})
    times: dict[str, list[float]] = {name: [] for name in variants}
    with torch.inference_mode():
        for fn in variants.values():  # warm-up
            fn()
        for _ in range(args.rounds):
            for name, fn in variants.items():
                started = time.process_time()
                fn()
                times[name].append(time.process_time() - started)
    tokens = sum(b.tokens for b in batches)
    print(f"Machine: {platform.platform()}, Python {platform.python_version()}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads); demo model {args.dtype} on cpu; {len(batches)} batches of "
          f"{args.batch_size} x {args.seq_len} ({tokens:,} tokens), {args.rounds} rounds after one warm-up.\n")
    print("| pass | median CPU seconds per round | ratio to bare forward (median over rounds) |")
    print("|---|---|---|")
    for name, values in times.items():
        ratios = [v / b for v, b in zip(values, times["bare forward"], strict=True)]
        print(f"| {name} | {statistics.median(values):.3f} | {statistics.median(ratios):.3f} |")
    print()
    for name, values in times.items():
        print(f"{name}: " + ", ".join(f"{v:.3f}" for v in values))

    corpus = {"files": [args.corpus], "seq_len": args.seq_len, "batch_size": args.batch_size,
              "max_tokens": args.max_tokens}
    started = time.process_time()
    insp.ablate(**corpus)
    alone_s = time.process_time() - started
    started = time.process_time()
    report = insp.ablate(**corpus, importance=True, layers=[args.importance_layer])
    importance_s = time.process_time() - started
    bare_s = statistics.median(times["bare forward"])
    print(f"\nablate, baseline alone (tokenizing the corpus + 1 pass): {alone_s:.2f} s")
    print(f"--importance --layers {args.importance_layer}: {report.run['passes_per_batch']} passes per batch, "
          f"{importance_s:.2f} s = {importance_s / bare_s:.1f}x one bare forward over the pre-tokenized batches "
          f"({bare_s:.3f} s), {importance_s / alone_s:.1f}x the baseline-alone run")
    print(report.spearman.to_string(index=False))


if __name__ == "__main__":
    main()
