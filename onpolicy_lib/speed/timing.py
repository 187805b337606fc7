"""Measuring: repeated timings with warm-up, their peak memory, the CPU other processes took meanwhile,
and the machine they ran on."""

from __future__ import annotations

import contextlib
import gc
import os
import re
import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from onpolicy_lib.cpu_threads import busy_seconds

# Cores' worth of CPU time other processes took while a contender was timed, above which its timings are
# flagged as contended: they then measure the machine's load rather than the step. Measured directly
# (the machine's busy time less ours), because this process's own CPU share says nothing once its
# threads sleep at barriers instead of spinning.
CONTENDED_OTHERS = 0.25


@dataclass
class Timing:
    """Seconds per repetition (after warm-up) and the peak memory while they ran."""

    seconds: list[float] = field(default_factory=list)
    peak_mb: float | None = None
    cpu_share: float | None = None  # process CPU time / (wall time x threads) over the timed repetitions
    others_cores: float | None = None  # CPU time other processes took over the timed repetitions / wall time
    parts: dict[str, list[float]] = field(default_factory=dict)  # sub-timings per repetition

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    def part(self, name: str) -> float | None:
        values = self.parts.get(name)
        return statistics.median(values) if values else None

    def as_dict(self) -> dict[str, Any]:
        return {"median_s": self.median, "seconds": self.seconds, "peak_mb": self.peak_mb,
                "cpu_share": self.cpu_share, "others_cores": self.others_cores,
                "parts_median_s": {k: self.part(k) for k in self.parts}}


def sync(device: torch.device) -> None:
    """Wait for queued kernels, so a timing covers the work and not just its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss_hwm_kib() -> int | None:
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    found = re.search(r"VmHWM:\s+(\d+)", status)
    return int(found.group(1)) if found else None


@contextlib.contextmanager
def peak_memory(device: torch.device, timing: Timing) -> Iterator[None]:
    """Record the peak memory of the enclosed block in ``timing.peak_mb``.

    On CPU the kernel's high-water mark of resident memory is reset first (Linux
    ``clear_refs``), so each contender gets its own peak rather than the process's;
    where that is unavailable the process-lifetime peak is reported instead.
    """
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        with contextlib.suppress(OSError):
            Path("/proc/self/clear_refs").write_text("5")
    try:
        yield
    finally:
        if device.type == "cuda":
            timing.peak_mb = torch.cuda.max_memory_allocated(device) / 2**20
        else:
            hwm = _rss_hwm_kib()
            timing.peak_mb = (hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024


def timed(fn: Callable[[], dict[str, float] | None], steps: int, warmup: int, device: torch.device,
          label: str = "") -> Timing:
    """Run ``fn`` ``warmup`` times untimed, then ``steps`` times timed (synchronised on CUDA).

    ``fn`` may return named sub-timings of its repetition; they are kept per repetition in ``parts``.
    """
    timing = Timing()
    cpu_seconds, machine_seconds = 0.0, 0.0
    with peak_memory(device, timing):
        for i in range(warmup + steps):
            sync(device)
            start, cpu_start, machine_start = time.perf_counter(), time.process_time(), busy_seconds()
            parts = fn() or {}
            sync(device)
            elapsed = time.perf_counter() - start
            machine_end = busy_seconds()
            if i >= warmup:
                cpu_seconds += time.process_time() - cpu_start
                if machine_start is not None and machine_end is not None:
                    machine_seconds += machine_end - machine_start
                timing.seconds.append(elapsed)
                for name, value in parts.items():
                    timing.parts.setdefault(name, []).append(value)
            if label:
                kind = "warm-up" if i < warmup else "step"
                print(f"  {label}: {kind} {i + 1}/{warmup + steps} {elapsed:.2f} s", file=sys.stderr, flush=True)
    wall = sum(timing.seconds)
    timing.cpu_share = cpu_seconds / (wall * torch.get_num_threads())
    if device.type == "cpu" and machine_seconds:
        # /proc/stat counts in clock ticks: a small negative difference is rounding, not a process.
        timing.others_cores = max(0.0, machine_seconds - cpu_seconds) / wall
    return timing


def release() -> None:
    """Free one contender's student, optimizer state and activations before the next is measured."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def load_average() -> tuple[float, float, float] | None:
    return os.getloadavg() if hasattr(os, "getloadavg") else None


