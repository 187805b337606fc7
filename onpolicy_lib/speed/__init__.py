"""``python -m onpolicy_lib.speed``: what one distillation step costs, against its arithmetic and stock TRL.

On one fixed batch of real prompts and completions, with the same teacher and a fresh
copy of the same quantization-aware student for every contender, it times

* the **floor**: a student forward+backward plus a teacher forward on that batch (the
  arithmetic a step cannot avoid; the optimizer step is timed on its own line);
* **our** full optimisation step (``DistillTrainer.training_step``, gradient clipping,
  AdamW, schedule) at λ=0 and at λ=1;
* **stock TRL**'s ``GKDTrainer`` step on the same batch and settings at λ=0 and λ=1, with
  its defaults (which include gradient checkpointing, so its rollouts run without a KV
  cache) and again with ``gradient_checkpointing=False``;
* **generation** tokens/s through ``DistillTrainer.rollout``: plain weights, our student
  as an on-policy step samples it (weights quantized once per step), the same with the
  opt-in bf16 weights and weight-major decode products, the same with the weights
  materialised for the call alone, and the fake-quantized forward TRL samples from;
* **peak memory** of each (CPU: the process's resident set; CUDA: ``max_memory_allocated``),
* the machine's **ceilings** (memory read bandwidth, GEMM throughput) and one cached decode
  step of the batch in each form a rollout can take (fp32, bf16, each also weight-major),
  against reading its weights once at that bandwidth (``--skip-hardware`` leaves it out),
* a student's **evaluation** (benchmarks, perplexity, fidelity; small samples) against the
  forward passes and decode steps it needs (:mod:`.evaluation`; ``--skip-eval`` leaves it out),

and prints medians after warm-up and the ratios the performance targets are stated in.
At λ=1 every contender generates exactly ``max_new_tokens`` per row (``min_new_tokens`` is
set equal), so they all do the same work (the table's ``tokens`` column shows the completion
tokens each step scored). The model, data, student and GKD parameters default to the demo's
(:class:`~onpolicy_lib.config.TrainConfig`). Runs on CPU and on CUDA unchanged; ``--device cuda``
uses bf16 as training does there, and synchronises around every timing.

    python -m onpolicy_lib.speed                      # the demo's model, student and batch
    python -m onpolicy_lib.speed --skip-trl --steps 3 --json outputs/speed.json

Modules: :mod:`.timing` (how a contender is timed), :mod:`.contenders` (what is timed),
:mod:`.report` (ratios, targets and the printed tables), :mod:`.settings` (parameters, CLI).
"""

from __future__ import annotations

import copy
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from onpolicy_lib import cpu_threads, quantization
from onpolicy_lib.metrics import machine_description
from onpolicy_lib.models import resolve_device
from onpolicy_lib.rollouts import RolloutForm, eager_form, packed_available
from onpolicy_lib.speed.breakdown import breakdown, profile_step
from onpolicy_lib.speed.contenders import (
    load_setup,
    optimisation_step,
    our_trainer,
    run_trainer,
    time_floor,
    time_generation,
    to_device,
    trl_batch,
    trl_trainer,
)
from onpolicy_lib.speed.contention import busy_core_figures
from onpolicy_lib.speed.evaluation import eval_config, evaluation_figures
from onpolicy_lib.speed.hardware import DECODE_FORMS, ceilings, compiled_decode_step, decode_step, weight_bytes
from onpolicy_lib.speed.long_rollouts import long_rollout_figures
from onpolicy_lib.speed.report import format_report, ratios, report_stem, write_report
from onpolicy_lib.speed.settings import SpeedSettings, parse_args
from onpolicy_lib.speed.timing import Timing, load_average, release
from onpolicy_lib.student import build_student

__all__ = ["SpeedSettings", "format_report", "main", "parse_args", "run"]
# Contenders whose step is also profiled (breakdown.py), and their labels in the report.
BREAKDOWN = {"ours_0": "ours, lambda=0, fp32", "ours_0_bf16train": "ours, lambda=0, bf16 autocast (opt-in)"}


def run(s: SpeedSettings) -> dict[str, Any]:
    """Measure every contender on one batch; returns the figures (also printed by :func:`main`)."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()  # Trainer construction chatter is not part of the table
    cfg = s.train
    device = resolve_device(cfg.device)
    if s.threads:
        torch.set_num_threads(s.threads)
    elif device.type == "cpu":
        cpu_threads.configure_threads()  # as a training run sets them
    load_start = load_average()
    if s.busy_core:  # its variants run in fresh processes: nothing is loaded here
        return {"settings": {**s.as_dict(), "device": str(device)}, "machine": machine_description(device),
                "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
                "busy_core": busy_core_figures(cfg.to_dict(), s.busy_steps),
                "load_average": {"start": load_start, "end": load_average()}}
    setup = load_setup(cfg, device)
    tokenizer, teacher, group_size, features, chats = (setup.tokenizer, setup.teacher, setup.group_size,
                                                       setup.features, setup.chats)
    ours_batch = setup.batch

    def teacher_bf16() -> torch.nn.Module:
        # What a dtype=bfloat16 run's teacher is: its weights in bf16 (the student keeps fp32 masters).
        return copy.deepcopy(teacher).to(torch.bfloat16)

    def student() -> torch.nn.Module:
        torch.manual_seed(cfg.seed)  # the same starting point and sampling stream for every contender
        # The student trains what a run of these settings trains (the teacher itself stays frozen).
        return build_student(teacher, cfg.quant_type, group_size, train_embeddings=cfg.train_embeddings).to(device)

    results: dict[str, Any] = {
        "settings": {**s.as_dict(), "group_size": group_size, "device": str(device)},
        "machine": machine_description(device),
        "batch": {"prompt_tokens": [len(f["prompt_ids"]) for f in features],
                  "completion_tokens": [len(f["completion_ids"]) for f in features],
                  "shape": list(ours_batch["input_ids"].shape)},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }
    if not s.skip_hardware:
        print("hardware ceilings and a decode step ...", file=sys.stderr, flush=True)
        results["hardware"] = hardware_figures(teacher, ours_batch, device)
        release()
    if not s.skip_eval:
        print("a student's evaluation ...", file=sys.stderr, flush=True)
        results["evaluation"] = student_evaluation(teacher, tokenizer, cfg, group_size, s.eval_limit, device)
        release()
    if s.long_new_tokens:
        print(f"long rollouts ({s.long_new_tokens} new tokens) ...", file=sys.stderr, flush=True)
        results["long_rollouts"] = long_rollout_figures(
            teacher, tokenizer, cfg, s.long_new_tokens, s.long_max_length, s.long_steps, device,
            results.get("hardware") or ceilings(device), student)
        release()
    timings: dict[str, Timing] = {}
    if s.skip_steps:
        results.update(timings={}, tokens_per_s={}, ratios={},
                       load_average={"start": load_start, "end": load_average()})
        return results
    with tempfile.TemporaryDirectory() as out:
        # (d) generation through the rollout code path, and the lambda=1-shaped batch it yields.
        trainer = our_trainer(student(), teacher, tokenizer, cfg, device, out, lmbda=1.0)
        print("generation ...", file=sys.stderr, flush=True)
        timings.update(time_generation(trainer, teacher, ours_batch, s, device))
        on_policy_batch = trainer.rollout(teacher, ours_batch)
        del trainer
        release()

        # (a) the floor, on the dataset batch (lambda=0) and on a lambda=1-shaped batch.
        print("floor ...", file=sys.stderr, flush=True)
        timings.update(time_floor(student(), teacher, tokenizer, s, device, out, ours_batch, on_policy_batch))
        release()

        # (b) our step at lambda=0 and lambda=1, and at lambda=1 with the opt-in bf16 rollouts.
        # Then the opt-in forms: bf16 rollouts; compiled weight-major fp32 rollouts (compiled in the
        # warm-up step, timed apart); bf16 autocast training (dtype bfloat16: a bf16 teacher, fp32
        # master weights), on CPU only where it is not already the default.
        variants: list[tuple[str, float, dict[str, Any]]] = [
            ("ours_0", 0.0, {}), ("ours_1", 1.0, {}), ("ours_1_bf16", 1.0, {"rollout_dtype": "bfloat16"}),
            ("ours_1_compiled", 1.0, {"rollout_compile": True, "rollout_matmul": "weight_major"})]
        if device.type == "cpu" and packed_available():
            variants.insert(3, ("ours_1_packed", 1.0, {"rollout_matmul": "packed"}))
        if device.type == "cpu":
            variants += [("ours_0_bf16train", 0.0, {"bf16": True}), ("ours_1_bf16train", 1.0, {"bf16": True})]
        for key, lmbda, opt_in in variants:
            label = f"ours lambda={lmbda:g}" + "".join(f" {k}={v}" for k, v in opt_in.items())
            print(f"{label} ...", file=sys.stderr, flush=True)
            bf16 = opt_in.get("bf16", False)
            trainer = our_trainer(student(), teacher_bf16() if bf16 else teacher, tokenizer, cfg, device, out,
                                  lmbda=lmbda, **opt_in)
            if opt_in.get("rollout_compile"):
                compile_start = time.perf_counter()
                trainer.rollout(trainer.model, ours_batch)
                results["rollout_compile_s"] = time.perf_counter() - compile_start
            timings[key] = run_trainer(trainer, ours_batch, s.steps, s.warmup, device, "rollout", label)
            if key in BREAKDOWN:  # where the time went: one more step, profiled
                rate = (results.get("hardware") or {}).get("gemm_bf16_gflops" if bf16 else "gemm_fp32_gflops")
                profile = profile_step(lambda trainer=trainer: optimisation_step(trainer, ours_batch, device))
                results.setdefault("breakdown", {})[BREAKDOWN[key]] = breakdown(profile, timings[key].median, rate)
            del trainer
            release()

        # (c) stock TRL on the same batch, in its collator's layout: its defaults, then without
        # gradient checkpointing (which its defaults turn on, and which also disables its KV cache).
        if not s.skip_trl:
            batch = to_device(trl_batch(features, tokenizer, cfg.max_length), device)
            for key, checkpointing in (("trl", None), ("trl_nockpt", False)):
                for lmbda in (0.0, 1.0):
                    label = f"TRL{' no checkpointing' if key != 'trl' else ''} lambda={lmbda:g}"
                    print(f"{label} ...", file=sys.stderr, flush=True)
                    trainer = trl_trainer(student(), teacher, tokenizer, cfg, device, out, lmbda, chats,
                                          checkpointing)
                    timings[f"{key}_{lmbda:g}"] = run_trainer(trainer, batch, s.trl_steps, min(s.warmup, 1), device,
                                                              "generate_on_policy_outputs", label)
                    del trainer
                    release()

    new_tokens = cfg.per_device_train_batch_size * cfg.max_new_tokens
    results["timings"] = {k: v.as_dict() for k, v in timings.items()}
    results["tokens_per_s"] = {k: new_tokens / timings[k].median for k in
                               ("gen_plain", "gen_student", "gen_student_bf16", "gen_student_wm",
                                "gen_student_pk", "gen_student_compiled", "gen_materialised", "gen_fake_quant")
                               if k in timings}
    results["ratios"] = ratios(timings)
    results["load_average"] = {"start": load_start, "end": load_average()}
    others = [t.others_cores for t in timings.values() if t.others_cores is not None]
    results["others_cores_max"] = max(others) if others else None
    return results


def hardware_figures(model: torch.nn.Module, batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, Any]:
    """The machine's ceilings, and one cached decode step of the rollout batch in each form a rollout can
    take (:data:`~onpolicy_lib.speed.hardware.DECODE_FORMS`), each over the time to read its weights once
    at the measured bandwidth."""
    figures = ceilings(device)
    args = (batch["prompt_ids"], batch["prompt_attention_mask"], device)
    for form in DECODE_FORMS:
        if form.rollout_matmul == "packed" and not packed_available():
            continue
        if form.rollout_compile:
            seconds, figures[f"decode_{form.key}_compile_s"] = compiled_decode_step(
                model, *args, dtype=getattr(torch, form.rollout_dtype),
                weight_major=form.rollout_matmul == "weight_major")
            size = weight_bytes(model)
        else:
            with eager_form(model, RolloutForm(form.rollout_dtype, form.rollout_matmul)):
                seconds, size = decode_step(model, *args), weight_bytes(model)
        figures[f"weights_mb_{form.key}"] = size / 1e6
        figures[f"decode_{form.key}_s"] = seconds
        figures[f"decode_{form.key}_over_read"] = seconds / (size / (figures["read_gb_s"] * 1e9))
    return figures


def student_evaluation(teacher: torch.nn.Module, tokenizer, cfg, group_size: int, limit: int,
                       device: torch.device) -> dict[str, Any]:
    """:func:`~onpolicy_lib.speed.evaluation.evaluation_figures` of a student of ``cfg``'s scheme in the form
    it is evaluated in (converted, dequantized: the round-to-nearest copy of the teacher costs exactly that)."""
    import copy

    from onpolicy_lib.evaluate import fidelity_for

    student = quantization.quantize_ptq(copy.deepcopy(teacher), cfg.quant_type, group_size)
    quantization.dequantize_for_eval(student)
    eval_cfg = eval_config(limit)
    fidelity = fidelity_for(cfg.to_dict(), eval_cfg.fidelity_samples, tokenizer, {})
    return evaluation_figures(student.eval(), teacher, tokenizer, eval_cfg, fidelity, device)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark from command-line arguments, print the report, optionally write JSON."""
    settings = parse_args(argv)
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    results = run(settings)
    text = format_report(results)
    print(text, flush=True)
    if settings.json:
        path = Path(settings.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=2))
    if settings.report_dir:
        write_report(Path(settings.report_dir), report_stem(results["machine"]), results, text)
    return results
