"""Benchmark `compare`: its time against two bare forward passes, memory flatness over corpus length, disk per token.

Timing: two copies of the `balance` benchmark model (random Mixtral architecture, ~112M parameters; the second copy
has its routers perturbed so routes differ), batches of 4 x 512 token ids. Per round, interleaved: the bare forward
of A then of B over the batches (full forward with logits, no hooks), then the whole two-pass ``compare`` over the
same batches (A's pass with its on-disk record, B's pass compared against it, tables at the end). Both models are
loaded once before timing, so loading is in neither figure. Reported as the median ratio over rounds, of wall time
and of the process's CPU time (steadier on a shared machine, where other processes stretch the wall time).

Memory: peak RSS of ``Inspector.compare`` in two-pass mode (model B loaded from disk after A's pass) over 100k and 1M
tokens, each in a fresh subprocess, with a small model so the 1M-token run stays short; the record's bytes per token
come from the run itself.

    python benchmarks/bench_compare.py --part timing --rounds 3 --batches 3
    python benchmarks/bench_compare.py --part memory
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_balance import build_model, stdlib_text, train_tokenizer


def _perturb_routers(model: torch.nn.Module, seed: int = 1) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.endswith("mlp.gate"):
                module.weight.add_(torch.randn(module.weight.shape, generator=generator) * 0.02)


def timing(rounds: int, batches: int, batch_size: int, seq_len: int) -> dict:
    import moe_inspect
    from moe_inspect.analysis.compare import compare_two_pass
    from moe_inspect.io.corpus import Batch

    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i in range(2):
            model = build_model(hidden=512, intermediate=1024, layers=6, vocab=32000)
            if i:
                _perturb_routers(model)
            paths.append(Path(tmp) / f"m{i}")
            model.save_pretrained(paths[-1])
        params = sum(p.numel() for p in model.parameters())
        a = moe_inspect.load(str(paths[0]), tokenizer=object(), device="cpu", dtype="float32").loaded
        b = moe_inspect.load(str(paths[1]), tokenizer=object(), device="cpu", dtype="float32").loaded
    generator = torch.Generator().manual_seed(0)
    mask = torch.ones(batch_size, seq_len, dtype=torch.long)
    data = [
        Batch(torch.randint(0, 32000, (batch_size, seq_len), generator=generator), mask, mask.numel(), 0)
        for _ in range(batches)
    ]

    def bare() -> None:
        for loaded in (a, b):
            for batch in data:
                loaded.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)

    reports = []

    def whole_compare() -> None:
        reports.append(compare_two_pass(lambda: a, lambda: b, data))

    times: dict[str, list[float]] = {"two bare forwards": [], "compare (two-pass)": []}
    cpu: dict[str, list[float]] = {"two bare forwards": [], "compare (two-pass)": []}
    with torch.inference_mode():
        bare()  # warm-up
    whole_compare()
    for _ in range(rounds):
        for name, run in (("two bare forwards", bare), ("compare (two-pass)", whole_compare)):
            start, start_cpu = time.perf_counter(), time.process_time()
            with torch.inference_mode():
                run()
            times[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    ratios = [c / t for c, t in zip(times["compare (two-pass)"], times["two bare forwards"], strict=True)]
    cpu_ratios = [c / t for c, t in zip(cpu["compare (two-pass)"], cpu["two bare forwards"], strict=True)]
    summary = reports[-1].summary.iloc[0]
    return {
        "params_per_model": params,
        "rounds": rounds,
        "batches_per_round": batches,
        "batch": f"{batch_size}x{seq_len}",
        "median_s": {name: statistics.median(t) for name, t in times.items()},
        "ratio_compare_over_two_bare": statistics.median(ratios),
        "median_cpu_s": {name: statistics.median(t) for name, t in cpu.items()},
        "cpu_ratio_compare_over_two_bare": statistics.median(cpu_ratios),
        "record_bytes_per_token": float(summary["record_bytes_per_token"]),
        "first_choice_agreement": float(summary["first_choice_agreement"]),
        "all_s": times,
        "all_cpu_s": cpu,
    }


def _memory_child(tokens: int, dir_a: str, dir_b: str, corpus: str) -> None:
    import moe_inspect

    insp = moe_inspect.load(dir_a)
    report = insp.compare(moe_inspect.LoadOptions(dir_b), files=[corpus], seq_len=512, batch_size=4, max_tokens=tokens)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    summary = report.summary.iloc[0]
    print(
        json.dumps(
            {
                "tokens": int(summary["tokens"]),
                "peak_rss_mib": peak_kib / 1024,
                "s": report.run["elapsed_s"],
                "record_mib": float(summary["record_bytes"]) / 2**20,
                "record_bytes_per_token": float(summary["record_bytes_per_token"]),
            }
        )
    )


def memory(token_counts: list[int]) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        text = stdlib_text()
        corpus = Path(tmp) / "corpus.txt"
        with corpus.open("w") as handle:
            for _ in range(max(1, max(token_counts) // 2_000_000 + 1)):
                handle.write(text)
        tokenizer = train_tokenizer(text, 512, lines=20000)
        dirs = []
        for i in range(2):
            model = build_model(hidden=64, intermediate=128, layers=4, vocab=len(tokenizer))
            if i:
                _perturb_routers(model)
            dirs.append(str(Path(tmp) / f"m{i}"))
            model.save_pretrained(dirs[-1])
            tokenizer.save_pretrained(dirs[-1])
        results = []
        for tokens in token_counts:
            out = subprocess.run(
                [sys.executable, __file__, "--memory-child", str(tokens), *dirs, str(corpus)],
                check=True,
                capture_output=True,
                text=True,
            )
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))
        return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["timing", "memory", "both"], default="both")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--memory-tokens", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--memory-child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        tokens, dir_a, dir_b, corpus = args.memory_child
        _memory_child(int(tokens), dir_a, dir_b, corpus)
        return
    print(
        f"machine: {platform.platform()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    if args.part in ("timing", "both"):
        result = timing(args.rounds, args.batches, args.batch_size, args.seq_len)
        print(json.dumps({k: v for k, v in result.items() if not k.startswith("all_")}, indent=2))
        print("per-round seconds:", json.dumps({k: [round(x, 3) for x in v] for k, v in result["all_s"].items()}))
        cpu = {k: [round(x, 3) for x in v] for k, v in result["all_cpu_s"].items()}
        print("per-round CPU seconds:", json.dumps(cpu))
    if args.part in ("memory", "both"):
        for row in memory(args.memory_tokens):
            print(json.dumps(row))


if __name__ == "__main__":
    main()
