"""The step and the decode step beside a busy core: how each degrades when another process takes one core.

Two workloads, because they stress the OpenMP runtime differently: a short λ=0 training step (large
products, few barriers per second) and decoding (a rollout of the benchmark's batch, greedy, every row
generating all its tokens: hundreds of small parallel regions per token, so a barrier every few tens of
microseconds). Each variant runs in a fresh process (the OpenMP wait policy is read once, when torch
loads), with a thread per core: the OpenMP runtime's own policy (a long spin), as torch runs by default;
a bounded spin (what this package's default chooses on an idle machine, and keeps if a core is taken
later); and the default itself (:mod:`onpolicy_lib.cpu_threads`), which waits passively when a core is
busy as it starts. Each is timed alone, then beside ``python -c "while True: pass"`` pinned to the last
core it may use (started first), one after the other, so the machine's other load is about the same for both.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

from onpolicy_lib.cpu_threads import THREADS_ENV, WAIT_ENV, WAIT_POLICY_KEYS

TARGET_BUSY = 2.5  # a step beside one busy core of two, over the step alone
CHILD_TIMEOUT_S = 900
DECODE_TOKENS = 32  # per row, in the decode workload
WORKLOADS = (("step", "lambda=0 step"), ("decode", f"decode, {DECODE_TOKENS} tokens"))


def variants(cores: int) -> list[tuple[str, str, dict[str, str]]]:
    """(key, label, environment) of each variant."""
    return [("spin", f"runtime's wait policy (long spin), {cores} threads", {WAIT_ENV: "runtime",
                                                                            THREADS_ENV: str(cores)}),
            ("bounded", f"bounded spin, {cores} threads", {WAIT_ENV: "bounded", THREADS_ENV: str(cores)}),
            ("auto", f"the default (auto), {cores} threads", {WAIT_ENV: "auto", THREADS_ENV: str(cores)})]


def _child_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in (*WAIT_POLICY_KEYS, "OMP_NUM_THREADS", WAIT_ENV, THREADS_ENV)}
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
        ratios = {w: busy[w] / alone[w] if w in alone and w in busy else None for w, _ in WORKLOADS}
        out["variants"][key] = {"label": label, "alone": alone, "busy": busy, "busy_over_alone": ratios}
    return out



def format_busy(figures: dict[str, Any]) -> list[str]:
    lines = [f"(h) a short lambda=0 step and a rollout's decoding (batch rows x {DECODE_TOKENS} tokens), alone and "
             f"beside a busy loop pinned to cpu {figures['busy_cpu']} ({figures['cores']} cores), each variant in "
             "a fresh process; medians",
             f"{'variant':<56}{'workload':<18}{'threads':>8}{'alone s':>9}{'busy s':>9}{'ratio':>7}{'target':>8}"
             f"{'met':>5}"]
    for v in figures["variants"].values():
        threads = "/".join(str(v[k].get("threads", "?")) for k in ("alone", "busy"))
        for i, (w, name) in enumerate(WORKLOADS):
            def cell(run: dict[str, Any], w: str = w) -> str:
                return f"{run[w]:>9.2f}" if w in run else f"{'failed':>9}"

            ratio = v["busy_over_alone"].get(w)
            met = "" if ratio is None else ("✓" if ratio <= TARGET_BUSY else "✗")
            lines.append(f"{v['label'] if i == 0 else '':<56}{name:<18}{threads if i == 0 else '':>8}"
                         f"{cell(v['alone'])}{cell(v['busy'])}{'' if ratio is None else format(ratio, '.2f'):>7}"
                         f"{'<= ' + str(TARGET_BUSY):>8}{met:>5}")
        for k in ("alone", "busy"):
            if "error" in v[k]:
                lines.append(f"  {k}: {v[k]['error']}")
    return lines


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """A variant's process: the benchmark's λ=0 step on its batch, then greedy decoding of its prompts
    (:data:`DECODE_TOKENS` per row), each one warm-up then ``steps`` timed."""
    import tempfile

    import datasets
    import torch
    import transformers

    from onpolicy_lib import cpu_threads
    from onpolicy_lib.config import TrainConfig
    from onpolicy_lib.speed.contenders import load_setup, our_trainer, run_trainer
    from onpolicy_lib.speed.timing import timed
    from onpolicy_lib.student import build_student

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    threads = cpu_threads.configure_threads()
    cfg = TrainConfig(**spec["train"])
    device = torch.device("cpu")
    setup = load_setup(cfg, device)
    tokenizer, teacher, features, batch = setup.tokenizer, setup.teacher, setup.features, setup.batch
    torch.manual_seed(cfg.seed)
    student = build_student(teacher, cfg.quant_type, setup.group_size, train_embeddings=cfg.train_embeddings)
    with tempfile.TemporaryDirectory() as out:
        trainer = our_trainer(student, teacher, tokenizer, cfg, device, out, lmbda=0.0)
        timing = run_trainer(trainer, batch, spec["steps"], 1, device, "rollout", "")
    tokenizer.padding_side = "left"  # decoder-only generation continues every row from its last position
    prompts = tokenizer.pad([{"input_ids": f["prompt_ids"]} for f in features], return_tensors="pt")

    def decode() -> None:
        with torch.inference_mode():
            teacher.generate(**prompts, max_new_tokens=DECODE_TOKENS, min_new_tokens=DECODE_TOKENS, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)

    decoding = timed(decode, spec["steps"], 1, device, "")
    return {"step": timing.median, "step_seconds": timing.seconds, "decode": decoding.median,
            "decode_seconds": decoding.seconds, "threads": threads,
            "wait_policy": {k: os.environ[k] for k in WAIT_POLICY_KEYS if k in os.environ} or "runtime default"}


if __name__ == "__main__":
    print(json.dumps(child(json.loads(sys.argv[1]))), flush=True)
