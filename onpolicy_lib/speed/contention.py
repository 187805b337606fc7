"""The step beside a busy core: how a short λ=0 step degrades when another process takes one core.

Each variant runs in a fresh process (the OpenMP wait policy is read once, when torch loads): the
OpenMP runtime's own policy (threads spin at barriers) with a thread per core, as torch runs by
default; the passive policy with a thread per core (this package's default, :mod:`onpolicy_lib.cpu_threads`);
and the passive policy with threads only for the cores not busy at start (``ONPOLICY_QUANT_THREADS=available``).
Each is timed alone, then beside ``python -c "while True: pass"`` pinned to the last core it may use,
one after the other, so the machine's other load is about the same for both.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

from onpolicy_lib.cpu_threads import THREADS_ENV, WAIT_ENV

TARGET_BUSY = 2.5  # a step beside one busy core of two, over the step alone
CHILD_TIMEOUT_S = 900


def variants(cores: int) -> list[tuple[str, str, dict[str, str]]]:
    """(key, label, environment) of each variant."""
    return [("spin", f"runtime's wait policy (spinning), {cores} threads", {WAIT_ENV: "runtime",
                                                                           THREADS_ENV: str(cores)}),
            ("passive", f"passive wait (the default), {cores} threads", {THREADS_ENV: str(cores)}),
            ("passive_available", "passive wait, threads for the cores not busy at start",
             {THREADS_ENV: "available"})]


def _child_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("OMP_WAIT_POLICY", "KMP_BLOCKTIME", "OMP_NUM_THREADS", WAIT_ENV, THREADS_ENV)}
    return {**env, **extra}


def busy_loop(cpu: int) -> subprocess.Popen:
    """A single-threaded busy loop pinned to ``cpu``."""
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(proc.pid, {cpu})
    return proc


def run_child(train: dict[str, Any], steps: int, env: dict[str, str]) -> dict[str, Any]:
    """One variant's timing in a fresh process: ``{"seconds": [...], "median_s", "threads", ...}`` or ``{"error"}``."""
    spec = json.dumps({"train": train, "steps": steps})
    try:
        done = subprocess.run([sys.executable, "-m", "onpolicy_lib.speed.contention", spec], capture_output=True,
                              text=True, env=_child_env(env), timeout=CHILD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {"error": f"over {CHILD_TIMEOUT_S} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        return {"error": (done.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(lines[-1])


def busy_core_figures(train: dict[str, Any], steps: int) -> dict[str, Any]:
    """Each variant alone and beside a busy core (the last this process may use)."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    out: dict[str, Any] = {"cores": len(cpus), "busy_cpu": cpus[-1], "variants": {}}
    for key, label, env in variants(len(cpus)):
        print(f"busy core: {label} ...", file=sys.stderr, flush=True)
        alone = run_child(train, steps, env)
        loop = busy_loop(cpus[-1])
        try:
            time.sleep(0.5)  # the loop holds its core before the variant starts (and counts its cores)
            busy = run_child(train, steps, env)
        finally:
            loop.kill()
            loop.wait()
        ratio = busy["median_s"] / alone["median_s"] if "median_s" in alone and "median_s" in busy else None
        out["variants"][key] = {"label": label, "alone": alone, "busy": busy, "busy_over_alone": ratio}
    return out


def format_busy(figures: dict[str, Any]) -> list[str]:
    lines = [f"(h) a short lambda=0 step alone and beside a busy loop pinned to cpu {figures['busy_cpu']} "
             f"({figures['cores']} cores), each in a fresh process",
             f"{'variant':<58}{'threads':>8}{'alone s':>9}{'busy s':>9}{'ratio':>7}{'target':>8}{'met':>5}"]
    for v in figures["variants"].values():
        def cell(run: dict[str, Any]) -> str:
            return f"{run['median_s']:>9.2f}" if "median_s" in run else f"{'failed':>9}"

        threads = "/".join(str(v[k].get("threads", "?")) for k in ("alone", "busy"))
        ratio = v["busy_over_alone"]
        met = "" if ratio is None else ("✓" if ratio <= TARGET_BUSY else "✗")
        lines.append(f"{v['label']:<58}{threads:>8}{cell(v['alone'])}{cell(v['busy'])}"
                     f"{'' if ratio is None else format(ratio, '.2f'):>7}{'<= ' + str(TARGET_BUSY):>8}{met:>5}")
        for k in ("alone", "busy"):
            if "error" in v[k]:
                lines.append(f"  {k}: {v[k]['error']}")
    return lines


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """A variant's process: the benchmark's λ=0 step on its batch, one warm-up then ``steps`` timed."""
    import tempfile

    import datasets
    import torch
    import transformers

    from onpolicy_lib import cpu_threads, quantization
    from onpolicy_lib.batches import DistillCollator
    from onpolicy_lib.config import TrainConfig
    from onpolicy_lib.models import load_model, load_tokenizer
    from onpolicy_lib.speed.contenders import fixed_batch, our_trainer, run_trainer, to_device
    from onpolicy_lib.student import build_student

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    threads = cpu_threads.configure_threads()
    cfg = TrainConfig(**spec["train"])
    device = torch.device("cpu")
    tokenizer = load_tokenizer(cfg.model_name)
    teacher = load_model(cfg.model_name, device=device).eval().requires_grad_(False)
    group_size = quantization.resolve_group_size(teacher, cfg.group_size)
    features, _ = fixed_batch(tokenizer, cfg.dataset_name, cfg.per_device_train_batch_size, cfg.max_length,
                              cfg.min_completion_tokens)
    batch = to_device(DistillCollator(tokenizer.pad_token_id)(features), device)
    torch.manual_seed(cfg.seed)
    student = build_student(teacher, cfg.quant_type, group_size, train_embeddings=cfg.train_embeddings)
    with tempfile.TemporaryDirectory() as out:
        trainer = our_trainer(student, teacher, tokenizer, cfg, device, out, lmbda=0.0)
        timing = run_trainer(trainer, batch, spec["steps"], 1, device, "rollout", "")
    return {"seconds": timing.seconds, "median_s": timing.median, "cpu_share": timing.cpu_share, "threads": threads,
            "wait_policy": os.environ.get("OMP_WAIT_POLICY", "runtime default")}


if __name__ == "__main__":
    print(json.dumps(child(json.loads(sys.argv[1]))), flush=True)
