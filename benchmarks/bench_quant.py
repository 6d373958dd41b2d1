"""Benchmark loading in bf16, 8-bit and 4-bit: load time, real footprint, peak memory, and `balance` throughput.

Each mode runs in a fresh subprocess that loads the same bf16 checkpoint through moe-inspect's loader. Peak memory
is the peak of the process's *anonymous* resident memory (RssAnon in /proc/self/status, sampled every 2 ms) above
what it held before loading: safetensors files are memory-mapped, so their page-cache pages show up in VmRSS/VmHWM
although they are reclaimable and not a copy of the weights; VmHWM is reported alongside.

    python benchmarks/bench_quant.py                        # the balance benchmark model, Markdown report
    python benchmarks/bench_quant.py --tokens 16384
    python benchmarks/bench_quant.py --child DIR MODE CORPUS TOKENS   # one measurement, JSON (used by the tests)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
MODES = ("bf16", "8bit", "4bit-nf4")


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


class AnonPeak:
    """Samples RssAnon in a thread; ``peak`` is the highest value seen, in bytes."""

    def __init__(self, interval: float = 0.002) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _status_kib("RssAnon") * 1024)
            time.sleep(self.interval)

    def __enter__(self) -> AnonPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _status_kib("RssAnon") * 1024)


def child(model_dir: str, mode: str, corpus: str, tokens: int) -> dict:
    """Load ``model_dir`` in ``mode`` and, when ``corpus`` is given, run balance over ``tokens`` tokens."""
    import torch

    from moe_inspect.api import Inspector
    from moe_inspect.model.loading import load
    from moe_inspect.model.options import LoadOptions
    from moe_inspect.model.source import load_tokenizer

    fields = {"bf16": {}, "8bit": {"load_in_8bit": True}, "4bit-nf4": {"load_in_4bit": True}}[mode]
    options = LoadOptions(model_dir, dtype="bfloat16", device="cpu", **fields)
    tokenizer = load_tokenizer(model_dir)
    torch.zeros(1)  # torch's allocator and thread pools exist before the baseline, and so do the backend's libraries
    if fields:
        import bitsandbytes  # noqa: F401
    baseline = _status_kib("RssAnon") * 1024
    start = time.perf_counter()
    with AnonPeak() as peak:
        loaded = load(options, tokenizer=tokenizer)
    load_s = time.perf_counter() - start
    result = {
        "mode": mode,
        "load_s": load_s,
        "footprint": loaded.footprint_bytes(),
        "peak_anon_over_baseline": peak.peak - baseline,
        "vmhwm": _status_kib("VmHWM") * 1024,
    }
    if corpus:
        start = time.perf_counter()
        report = Inspector(loaded).balance(files=[corpus], seq_len=512, batch_size=4, max_tokens=tokens)
        seconds = time.perf_counter() - start
        routed = int(report.layers["tokens"].iloc[0])
        result.update(balance_s=seconds, balance_tokens=routed, tokens_per_s=routed / seconds)
    return result


def build_checkpoint(path: Path) -> int:
    """The balance benchmark's model (random Mixtral, ~112M parameters) saved in bf16, with the demo tokenizer."""
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_balance import build_model

    from moe_inspect.model.source import demo_model_path, load_tokenizer

    model = build_model(hidden=512, intermediate=1024, layers=6, vocab=32000).to(torch.bfloat16)
    model.save_pretrained(path)
    load_tokenizer(str(demo_model_path())).save_pretrained(path)
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=16384, help="balance tokens per mode")
    parser.add_argument("--corpus", default=str(ROOT / "fixtures" / "heldout" / "mixed.txt"))
    parser.add_argument("--child", nargs=4, metavar=("DIR", "MODE", "CORPUS", "TOKENS"))
    args = parser.parse_args()
    if args.child:
        model_dir, mode, corpus, tokens = args.child
        print(json.dumps(child(model_dir, mode, corpus, int(tokens))))
        return
    import torch

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with tempfile.TemporaryDirectory() as tmp:
        params = build_checkpoint(Path(tmp))
        rows = []
        for mode in MODES:
            out = subprocess.run(
                [sys.executable, __file__, "--child", tmp, mode, args.corpus, str(args.tokens)],
                check=True, capture_output=True, text=True, env=env,
            )
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"Model: random MixtralForCausalLM, {params:,} parameters, saved in bf16; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {platform.machine()}, {os.cpu_count()} CPUs")
    print(f"Corpus: {args.corpus}, {args.tokens} tokens, seq-len 512, batch 4\n")
    print("| mode | load s | footprint MiB | peak anon. memory while loading MiB | VmHWM MiB | balance tokens/s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['load_s']:.2f} | {r['footprint'] / 2**20:.1f} | "
              f"{r['peak_anon_over_baseline'] / 2**20:.1f} | {r['vmhwm'] / 2**20:.0f} | {r['tokens_per_s']:,.0f} |")


if __name__ == "__main__":
    main()
