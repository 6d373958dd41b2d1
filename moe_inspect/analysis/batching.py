"""How many sequences a routing pass takes at once, and how much memory one batch really used.

Without logits, a routing pass holds only the decoder's activations, so batches can be much larger than a
causal-LM forward allows. On a CUDA device the default is measured, not guessed: one probe pass of a single
window gives the bytes a sequence needs at its peak, and the batch takes 80 % of the free memory at that rate.
On the CPU, throughput barely grows with batch size while memory does, so the default is a fixed number of
tokens per batch.
"""

from __future__ import annotations

import resource
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from moe_inspect.model.loading import LoadedModel

CPU_TOKENS_PER_BATCH = 8192  # 4 x 2048, the old default, whatever the window length
GPU_FREE_SHARE = 0.8  # of free device memory a batch may take; the rest absorbs allocator fragmentation
MAX_BATCH = 256


def _cuda_devices(loaded: LoadedModel) -> list[torch.device]:
    devices = {p.device for p in loaded.model.parameters() if p.device.type == "cuda"}
    return sorted(devices, key=lambda d: d.index or 0)


def default_batch_size(loaded: LoadedModel, seq_len: int) -> int:
    """Sequences per batch: measured from free CUDA memory, else ``CPU_TOKENS_PER_BATCH // seq_len``."""
    devices = _cuda_devices(loaded)
    if not devices:
        return max(1, CPU_TOKENS_PER_BATCH // seq_len)
    from moe_inspect.analysis.routing_pass import routing_forward

    before = {}
    for device in devices:
        torch.cuda.reset_peak_memory_stats(device)
        before[device] = torch.cuda.memory_allocated(device)
    ids = torch.zeros(1, seq_len, dtype=torch.long, device=loaded.input_device)
    with torch.inference_mode():
        routing_forward(loaded, ids, torch.ones_like(ids))
    sizes = []
    for device in devices:
        per_sequence = torch.cuda.max_memory_allocated(device) - before[device]
        free, _total = torch.cuda.mem_get_info(device)
        if per_sequence > 0:
            sizes.append(int(GPU_FREE_SHARE * free // per_sequence))
    return max(1, min([MAX_BATCH, *sizes]))


def _rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize()


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (Linux: writing 5 to clear_refs); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class BatchMemory:
    """The largest memory one batch added: CUDA peak allocated over what was allocated before it (summed over
    devices), or on the CPU the peak RSS over the RSS before it. Reading the figures costs no device sync."""

    def __init__(self, loaded: LoadedModel) -> None:
        self.devices = _cuda_devices(loaded)
        self.peak_bytes: int | None = None
        self._before: dict[torch.device, int] = {}
        self._rss_before = 0
        self._cpu = False
        self.method = "cuda max_memory_allocated - memory_allocated before the batch"
        if not self.devices:
            self._cpu = _reset_peak_rss()
            self.method = "peak RSS (VmHWM, reset per batch) - RSS before the batch" if self._cpu else "unavailable"

    def start(self) -> None:
        if self.devices:
            for device in self.devices:
                torch.cuda.reset_peak_memory_stats(device)
                self._before[device] = torch.cuda.memory_allocated(device)
        elif self._cpu:
            self._rss_before = _rss_bytes()
            _reset_peak_rss()

    def stop(self) -> None:
        if self.devices:
            used = sum(torch.cuda.max_memory_allocated(d) - self._before[d] for d in self.devices)
        elif self._cpu:
            used = max(0, _peak_rss_bytes() - self._rss_before)
        else:
            return
        self.peak_bytes = used if self.peak_bytes is None else max(self.peak_bytes, used)
