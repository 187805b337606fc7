"""What a training run measures about itself: losses, step times, tokens, memory.

A ``TrainerCallback`` that streams every log line to the run's training log (so a
killed run still has its history) and summarises the run for its metrics file.
"""

from __future__ import annotations

import contextlib
import os
import platform
import re
import resource
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from onpolicy_lib.config import portable_path
from onpolicy_lib.rundir import Run

# CPU features that change which kernels torch runs (and so speed and the last bits of results).
_CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def machine_description(device: torch.device) -> str:
    """The accelerator, or the CPU model with family/model numbers and the kernel-relevant flags.

    Recorded with every run: wall times compare only within one machine type, and fake quantization's
    rounding makes bit-identical results hold only on the same CPU type and library versions.
    """
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        info = Path("/proc/cpuinfo").read_text()
        fields = {k: re.search(rf"^{k}\s*:\s*(.+)$", info, re.M) for k in ("model name", "cpu family", "model")}
        flags = re.search(r"^flags\s*:\s*(.+)$", info, re.M)
        if fields["model name"]:
            cpu = fields["model name"].group(1).strip()
        if fields["cpu family"] and fields["model"]:
            cpu += f" (family {fields['cpu family'].group(1).strip()}, model {fields['model'].group(1).strip()})"
        if flags:
            present = [f for f in _CPU_FLAGS if f in flags.group(1).split()]
            cpu += f", {'/'.join(present) or 'no AVX2'}"
    threads = torch.get_num_threads()
    return (f"{cpu}, {os.cpu_count()} CPU cores, torch {torch.__version__} "
            f"({threads} thread{'' if threads == 1 else 's'})")


def peak_memory_mb(device: torch.device) -> float:
    """Peak accelerator memory on CUDA; peak resident set size of this process on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class MetricsRecorder(TrainerCallback):
    def __init__(self, run: Run) -> None:
        self.run = run
        self.step_seconds: list[float] = []
        self.history: list[dict[str, Any]] = []
        self._t_step = 0.0
        self._t_train = 0.0
        self.train_seconds = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        self._t_train = time.perf_counter()

    def on_step_begin(self, args, state, control, **kwargs):
        self._t_step = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.step_seconds.append(time.perf_counter() - self._t_step)

    def on_train_end(self, args, state, control, **kwargs):
        self.train_seconds = time.perf_counter() - self._t_train

    def on_log(self, args, state, control, logs=None, **kwargs):
        record = {"step": state.global_step, "time": time.time(), **(logs or {})}
        self.history.append(record)
        if state.is_world_process_zero:  # one log per run, whatever the number of processes
            self.run.append_log(record)


COUNTERS = ("tokens_generated", "tokens_trained", "rollout_seconds", "batches", "batches_on_policy",
            "batches_seq_kd", "flops")


def summarise(recorder: MetricsRecorder, unlogged: dict[str, Any], device: torch.device,
              extra: dict[str, Any]) -> dict[str, Any]:
    """The run's metrics: per-step history plus run totals (counters summed over all attempts' logs)."""
    steps = recorder.run.log()
    totals = {k: sum(r.get(k, 0) for r in steps) + unlogged.get(k, 0) for k in COUNTERS}
    return {
        "steps": [{"step": r["step"], "loss": r["loss"], "learning_rate": r.get("learning_rate"),
                   "on_policy_fraction": r.get("on_policy_fraction")} for r in steps],
        "wall_time_s": round(recorder.train_seconds, 2),
        "median_step_s": round(statistics.median(recorder.step_seconds), 3) if recorder.step_seconds else None,
        "steps_timed": len(recorder.step_seconds),
        **{k: round(v, 2) if isinstance(v, float) else v for k, v in totals.items()},
        "peak_memory_mb": round(peak_memory_mb(device), 1),
        "device": str(device),
        **extra,
    }


def loss_summary(steps: list[dict[str, Any]]) -> dict[str, float]:
    """Mean training loss over the first and the last 10% of steps (at least one step each)."""
    losses = [s["loss"] for s in steps if s.get("loss") is not None]
    if not losses:
        return {}
    k = max(1, len(losses) // 10)
    return {"train_loss_first": sum(losses[:k]) / k, "train_loss_final": sum(losses[-k:]) / k}


def run_summary(run: Run) -> pd.DataFrame:  # noqa: F821 (pandas imported lazily)
    """A one-column table of a run's headline numbers, for notebooks."""
    import pandas as pd

    m = run.metrics or {}
    losses = loss_summary(m.get("steps", []))
    rows = {
        "run directory": portable_path(run.path),
        "steps": len(m.get("steps", [])),
        "train loss, first 10% of steps (mean)": round(losses["train_loss_first"], 5) if losses else None,
        "train loss, last 10% of steps (mean)": round(losses["train_loss_final"], 5) if losses else None,
        "held-out divergence before": round(m["heldout_loss_before"], 5),
        "held-out divergence after": round(m["heldout_loss_after"], 5),
        "on-policy batches": f"{m['batches_on_policy']} / {m['batches']}",
        "tokens generated": m["tokens_generated"],
        "tokens trained on": m["tokens_trained"],
        "wall time (s)": m["wall_time_s"],
        "median step (s)": m["median_step_s"],
        "peak memory (MB)": m["peak_memory_mb"],
    }
    return pd.DataFrame({"value": rows})
