"""Benchmark `balance`'s capture: overhead over the bare forward, and memory flatness over corpus length.

Timing: a random Mixtral-architecture model of about 110M total parameters, batches of 4 x 512 tokens.
Three variants run interleaved over the same batches in one process, round after round, so machine noise
hits them alike: the bare forward (no hooks), moe-inspect's capture with the full balance accumulator,
and transformers' own ``output_router_logits=True`` path (which also computes its aux loss). Reported as
median ratios over rounds.

Memory: peak RSS of a full ``Inspector.balance`` run over 100k and over 1M tokens, each in a fresh
subprocess, with a small model so the 1M-token run stays short; the accumulator's state is what could grow.

    python benchmarks/bench_balance.py                 # both parts, prints a Markdown report
    python benchmarks/bench_balance.py --part timing --rounds 5 --batches 4
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


def build_model(hidden: int, intermediate: int, layers: int, vocab: int, seed: int = 0) -> torch.nn.Module:
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=max(hidden // 64, 1),
        num_key_value_heads=max(hidden // 256, 1),
        num_local_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=4096,
    )
    torch.manual_seed(seed)
    return MixtralForCausalLM(config).eval()


def timing(rounds: int, batches: int, batch_size: int, seq_len: int, device: str = "cpu") -> dict:
    from moe_inspect.analysis.accumulate import BalanceAccumulator
    from moe_inspect.model.capture import capture
    from moe_inspect.model.routers import find_routers

    model = build_model(hidden=512, intermediate=1024, layers=6, vocab=32000).to(device)
    params = sum(p.numel() for p in model.parameters())
    routers = find_routers(model)
    generator = torch.Generator().manual_seed(0)
    data = [torch.randint(0, 32000, (batch_size, seq_len), generator=generator).to(device) for _ in range(batches)]
    mask_cpu = torch.ones(batch_size, seq_len, dtype=torch.long)
    mask = mask_cpu.to(device)

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    def bare() -> None:
        for ids in data:
            model(input_ids=ids, attention_mask=mask, use_cache=False)

    hook_seconds: list[float] = []

    class TimedAccumulator(BalanceAccumulator):
        """Adds up the time spent inside the capture sink (exact on the CPU, where nothing is async)."""

        spent = 0.0

        def __call__(self, spec, out) -> None:
            start = time.perf_counter()
            super().__call__(spec, out)
            self.spent += time.perf_counter() - start

        def end_batch(self) -> None:
            start = time.perf_counter()
            super().end_batch()
            self.spent += time.perf_counter() - start

    def with_capture() -> None:
        accumulator = TimedAccumulator(routers)
        with capture(routers, sink=accumulator, keep=False):
            for ids in data:
                accumulator.begin_batch(mask_cpu)
                model(input_ids=ids, attention_mask=mask, use_cache=False)
                accumulator.end_batch()
        accumulator.finish()
        hook_seconds.append(accumulator.spent)

    def hf_router_logits() -> None:
        for ids in data:
            model(input_ids=ids, attention_mask=mask, use_cache=False, output_router_logits=True)

    variants = {"bare": bare, "capture": with_capture, "output_router_logits": hf_router_logits}
    times: dict[str, list[float]] = {name: [] for name in variants}
    with torch.inference_mode():
        bare()  # warm-up: allocator, kernels, transformers' lazy hook install
        hf_router_logits()
        for _ in range(rounds):
            for name, run in variants.items():
                sync()
                start = time.perf_counter()
                run()
                sync()
                times[name].append(time.perf_counter() - start)
    ratios = {
        name: statistics.median(t / b for t, b in zip(times[name], times["bare"], strict=True))
        for name in ("capture", "output_router_logits")
    }
    tokens = batches * batch_size * seq_len
    return {
        "params": params,
        "rounds": rounds,
        "batches_per_round": batches,
        "batch": f"{batch_size}x{seq_len}",
        "device": device,
        "median_s": {name: statistics.median(t) for name, t in times.items()},
        "tokens_per_s_bare": tokens / statistics.median(times["bare"]),
        "ratio_capture_over_bare": ratios["capture"],
        "ratio_output_router_logits_over_bare": ratios["output_router_logits"],
        "accumulator_share_of_capture_run": statistics.median(
            h / t for h, t in zip(hook_seconds, times["capture"], strict=True)
        ),
        "all_s": times,
    }


def _memory_child(tokens: int, model_dir: str, corpus: str) -> None:
    import moe_inspect

    insp = moe_inspect.load(model_dir)
    report = insp.balance(files=[corpus], seq_len=512, batch_size=4, max_tokens=tokens)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"tokens": report.run["tokens"], "peak_rss_mib": peak_kib / 1024, "s": report.run["elapsed_s"]}))


def memory(token_counts: list[int]) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        text = stdlib_text()
        corpus = Path(tmp) / "corpus.txt"
        with corpus.open("w") as handle:  # ~8 MB per copy; enough copies for the largest run
            for _ in range(max(1, max(token_counts) // 2_000_000 + 1)):
                handle.write(text)
        tokenizer = train_tokenizer(text, 512, lines=20000)
        model = build_model(hidden=64, intermediate=128, layers=4, vocab=len(tokenizer))
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        results = []
        for tokens in token_counts:
            out = subprocess.run(
                [sys.executable, __file__, "--memory-child", str(tokens), tmp, str(corpus)],
                check=True,
                capture_output=True,
                text=True,
            )
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))
        return results


def train_tokenizer(text: str, vocab: int, lines: int = 40000):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(text.splitlines()[:lines], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>")


def stdlib_text() -> str:
    stdlib = Path(os.__file__).parent
    return "".join(p.read_text(errors="ignore") for p in sorted(stdlib.glob("*.py")))


def versus_forward(model_dir: str, corpus: str, rounds: int, batches: int, batch_size: int, seq_len: int) -> dict:
    """Whole ``Inspector.balance`` (tokenizing, routing pass, accumulator, tables) against a bare causal-LM
    forward script over the very same windows and batches: the script reads and tokenizes the corpus with the
    same reader, then calls the model. Also the forward alone over batches tokenized in advance, which only
    favours the bare side."""
    import moe_inspect

    insp = moe_inspect.load(model_dir)
    model = insp.model
    max_tokens = batches * batch_size * seq_len
    options = {"files": [corpus], "seq_len": seq_len, "batch_size": batch_size, "max_tokens": max_tokens}
    data = list(insp.corpus(**options).batches())
    assert len(data) == batches and all(b.input_ids.shape == (batch_size, seq_len) for b in data)

    def bare_script() -> None:
        with torch.inference_mode():
            for batch in insp.corpus(**options).batches():
                model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)

    def bare_forward() -> None:
        with torch.inference_mode():
            for batch in data:
                model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)

    def balance() -> None:
        report = insp.balance(**options)
        assert report.run["tokens"] == max_tokens

    variants = {"bare_script": bare_script, "bare_forward": bare_forward, "balance": balance}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for run in variants.values():  # warm-up (also learns the routing pass's stop point)
        run()
    for _ in range(rounds):
        for name, run in variants.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    head = model.get_output_embeddings().weight
    return {
        "model": model_dir,
        "params": sum(p.numel() for p in model.parameters()),
        "head": list(head.shape),
        "dtype": str(head.dtype),
        "batch": f"{batches} x {batch_size} x {seq_len}",
        "median_s": {name: statistics.median(t) for name, t in times.items()},
        "ratio_balance_over_bare_script": statistics.median(
            b / f for b, f in zip(times["balance"], times["bare_script"], strict=True)
        ),
        "ratio_balance_over_bare_forward": statistics.median(
            b / f for b, f in zip(times["balance"], times["bare_forward"], strict=True)
        ),
        "tokens_per_s_balance": max_tokens / statistics.median(times["balance"]),
        "all_s": times,
    }


def fastpass(
    rounds: int, batches: int, batch_size: int, seq_len: int, models: tuple[str, ...] = ("mixtral", "demo")
) -> list[dict]:
    """balance against the bare forward on a 4-layer Mixtral (hidden 512, vocab 8,192) and on the demo model."""
    from moe_inspect.model.source import demo_model_path

    text = stdlib_text()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.txt"
        corpus.write_text(text)
        if "mixtral" in models:
            tokenizer = train_tokenizer(text, 8192)
            model = build_model(hidden=512, intermediate=1024, layers=4, vocab=len(tokenizer))
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            del model
        folders = {"mixtral": tmp, "demo": str(demo_model_path())}
        for folder in (folders[name] for name in models):
            results.append(versus_forward(folder, str(corpus), rounds, batches, batch_size, seq_len))
    return results


def _loss_memory_child(model_dir: str, variant: str, batch_size: int, seq_len: int, batches: int) -> None:
    """One fresh process, one pass: peak RSS of the whole process, and what the pass added over the loaded model."""
    from moe_inspect.analysis.balance import run_balance
    from moe_inspect.analysis.batching import _peak_rss_bytes, _reset_peak_rss, _rss_bytes
    from moe_inspect.analysis.outputs import OutputHead, token_losses
    from moe_inspect.io.corpus import Batch
    from moe_inspect.model.loading import load
    from moe_inspect.model.options import LoadOptions

    loaded = load(LoadOptions(model=model_dir))
    vocab = loaded.model.get_output_embeddings().weight.shape[0]
    generator = torch.Generator().manual_seed(0)
    data = []
    for _ in range(batches):
        ids = torch.randint(0, vocab, (batch_size, seq_len), generator=generator)
        data.append(Batch(ids, torch.ones_like(ids), ids.numel(), 0))
    before = _rss_bytes()
    _reset_peak_rss()
    start = time.perf_counter()
    if variant == "balance":
        run_balance(loaded, data)
    else:
        head = OutputHead(loaded.model)
        with torch.inference_mode():
            for batch in data:
                token_losses(head, head.decode(batch.input_ids, batch.attention_mask))
    seconds = time.perf_counter() - start
    peak = _peak_rss_bytes()
    print(json.dumps({"variant": variant, "peak_rss_mib": peak / 2**20, "added_mib": (peak - before) / 2**20,
                      "loaded_rss_mib": before / 2**20, "s": seconds}))


def loss_memory(rounds: int, batch_size: int, seq_len: int, batches: int) -> dict:
    """Peak memory of an ablate-like loss pass (decoder + chunked token losses) against balance's, on a
    151,936-token vocabulary (Qwen's) with a tiny width so that 4 x 2048 batches run on a CPU. Each pass in its
    own fresh process; variants interleaved over rounds."""
    text = stdlib_text()
    runs: dict[str, list[dict]] = {"balance": [], "token_losses": []}
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = train_tokenizer(text[:2_000_000], 512)  # ids are drawn at random over the whole vocabulary
        model = build_model(hidden=128, intermediate=256, layers=2, vocab=151_936)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        del model
        for _ in range(rounds):
            for variant in runs:
                out = subprocess.run(
                    [sys.executable, __file__, "--loss-memory-child", tmp, variant, str(batch_size), str(seq_len),
                     str(batches)],
                    check=True, capture_output=True, text=True,
                )
                runs[variant].append(json.loads(out.stdout.strip().splitlines()[-1]))
    medians = {
        variant: {key: statistics.median(r[key] for r in rows) for key in ("peak_rss_mib", "added_mib", "s")}
        for variant, rows in runs.items()
    }
    return {
        "batch": f"{batches} x {batch_size} x {seq_len}",
        "medians": medians,
        "ratio_peak_rss": medians["token_losses"]["peak_rss_mib"] / medians["balance"]["peak_rss_mib"],
        "runs": runs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["timing", "memory", "both", "fastpass", "loss-memory"], default="both")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] for the timing part")
    parser.add_argument("--memory-tokens", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--memory-child", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--models", nargs="+", choices=["mixtral", "demo"], default=["mixtral", "demo"],
                        help="models of the fastpass part")
    parser.add_argument("--loss-memory-child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.loss_memory_child:
        model_dir, variant, batch_size, seq_len, batches = args.loss_memory_child
        _loss_memory_child(model_dir, variant, int(batch_size), int(seq_len), int(batches))
        return
    if args.memory_child:
        tokens, model_dir, corpus = args.memory_child
        _memory_child(int(tokens), model_dir, corpus)
        return
    print(f"machine: {platform.platform()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    if args.part in ("timing", "both"):
        result = timing(args.rounds, args.batches, args.batch_size, args.seq_len, args.device)
        print(json.dumps({k: v for k, v in result.items() if k != "all_s"}, indent=2))
        print("per-round seconds:", json.dumps({k: [round(x, 3) for x in v] for k, v in result["all_s"].items()}))
    if args.part == "fastpass":
        for result in fastpass(args.rounds, args.batches, args.batch_size, args.seq_len, tuple(args.models)):
            print(json.dumps({k: v for k, v in result.items() if k != "all_s"}, indent=2))
            print("per-round seconds:", json.dumps({k: [round(x, 3) for x in v] for k, v in result["all_s"].items()}))
    if args.part == "loss-memory":
        result = loss_memory(args.rounds, args.batch_size, args.seq_len, args.batches)
        print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))
        print("per-run:", json.dumps(result["runs"]))
    if args.part in ("memory", "both"):
        for row in memory(args.memory_tokens):
            print(json.dumps(row))


if __name__ == "__main__":
    main()
