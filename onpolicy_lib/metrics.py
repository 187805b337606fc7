"""What a training run measures about itself: losses, step times, tokens, memory.

A ``TrainerCallback`` that streams every log line to ``train_log.jsonl`` (so a
killed run still has its history) and summarises the run for ``metrics.json``.
"""

from __future__ import annotations

import json
import resource
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

LOG_FILE = "train_log.jsonl"


def peak_memory_mb(device: torch.device) -> float:
    """Peak accelerator memory on CUDA; peak resident set size of this process on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class MetricsRecorder(TrainerCallback):
    def __init__(self, run_dir: Path) -> None:
        self.log_path = Path(run_dir) / LOG_FILE
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
        with open(self.log_path, "a") as f:
            f.write(json.dumps(record) + "\n")


def read_log(run_dir: Path) -> list[dict[str, Any]]:
    """Every log record of a run, across resumed attempts (later attempts win per step)."""
    path = Path(run_dir) / LOG_FILE
    if not path.is_file():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    train = {r["step"]: r for r in records if "loss" in r}
    return [train[s] for s in sorted(train)]


COUNTERS = ("tokens_generated", "tokens_trained", "rollout_seconds", "batches", "batches_on_policy",
            "batches_seq_kd")


def summarise(recorder: MetricsRecorder, run_dir: Path, unlogged: dict[str, Any], device: torch.device,
              extra: dict[str, Any]) -> dict[str, Any]:
    """``metrics.json``: per-step history plus run totals (counters summed over all attempts' logs)."""
    steps = read_log(run_dir)
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


def run_summary(result) -> pd.DataFrame:  # noqa: F821 (pandas imported lazily)
    """A one-column table of a run's headline numbers, for notebooks."""
    import pandas as pd

    m = result.metrics
    losses = [s["loss"] for s in m["steps"]]
    head = losses[: max(1, len(losses) // 10)]
    tail = losses[-max(1, len(losses) // 10):]
    rows = {
        "run directory": str(result.run_dir),
        "steps": len(losses),
        "train loss, first 10% of steps (mean)": round(sum(head) / len(head), 5) if losses else None,
        "train loss, last 10% of steps (mean)": round(sum(tail) / len(tail), 5) if losses else None,
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
