"""Time `plan`'s EPLB on DeepSeek-V3's shape: 58 MoE layers x 256 experts, 8 expert groups.

The issue's shape, 256 + 32 slots on 64 GPUs, does not divide (288 / 64 = 4.5), so two shapes that do are
timed: 32 redundant on 32 GPUs / 4 nodes (DeepSeek's prefill deployment) and 64 redundant on 64 GPUs / 8 nodes.
Usage: python benchmarks/bench_plan.py [--repeats 20]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from moe_inspect.analysis.placement import plan_placement


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    weight = np.random.default_rng(0).gamma(0.5, size=(58, 256)) * 1000  # skewed, like measured expert load
    print("| slots | GPUs / nodes | policy | median ms | max ms |")
    print("|---|---|---|---|---|")
    for redundant, gpus, nodes in [(32, 32, 4), (64, 64, 8)]:
        for policy in ("hierarchical", "global"):
            plan_placement(weight, gpus, nodes, redundant, 8, policy)  # warm-up
            times = []
            for _ in range(args.repeats):
                started = time.perf_counter()
                plan_placement(weight, gpus, nodes, redundant, 8, policy)
                times.append((time.perf_counter() - started) * 1000)
            median, worst = statistics.median(times), max(times)
            print(f"| 256 + {redundant} | {gpus} / {nodes} | {policy} | {median:.1f} | {worst:.1f} |")


if __name__ == "__main__":
    main()
