"""Long rollouts: the step at the generation study's setting, and its decode steps against their roofline.

At 256 new tokens a λ=1 step is mostly its rollout, and a rollout is mostly decode steps, each reading
every weight once plus the KV cache so far. Their bound (the *roofline*) is, per step, the larger of

* the bytes it must read (the rollout form's weights, plus every cached key and value of every row up
  to that position) over the measured memory bandwidth, and
* its arithmetic (two FLOPs per weight per row, plus attention over the cached positions) over the
  measured fp32 GEMM rate,

summed over the rollout's positions. A decode step's time is measured as the difference between a
rollout of ``n`` tokens and one of a single token (the prefill and the first sample), per token, with
every row generating all ``n`` (``min_new_tokens = n``). The same decode step is also measured at larger
rollout batches (the prompts repeated, as when sampling several completions per prompt): the weights
are read once per step whatever the batch, so the time per generated token falls until the KV cache
or the arithmetic dominates.
"""

from __future__ import annotations

import dataclasses
import statistics
import tempfile
import time
from typing import Any

import torch

from onpolicy_lib import rollouts
from onpolicy_lib.batches import DistillCollator
from onpolicy_lib.config import TrainConfig
from onpolicy_lib.speed.contenders import fixed_batch, our_trainer, run_trainer, to_device
from onpolicy_lib.speed.hardware import weight_bytes
from onpolicy_lib.speed.timing import release, sync

TARGET_ROOFLINE = 1.5  # a rollout's decode steps over their roofline
_FORM_LABELS = {"linear": "linear", "weight_major": "weight-major", "packed": "packed"}


def kv_bytes_per_position(model: torch.nn.Module, dtype: torch.dtype = torch.float32) -> int:
    """Bytes of keys and values one row caches per position, over all layers."""
    shape = rollouts.model_shape(model)
    heads = shape.get("num_key_value_heads") or shape["num_attention_heads"]
    head_dim = shape.get("head_dim") or shape["hidden_size"] // shape["num_attention_heads"]
    return 2 * shape["num_hidden_layers"] * heads * head_dim * torch.finfo(dtype).bits // 8


def decode_flops(model: torch.nn.Module, rows: int, position: int) -> float:
    """FLOPs of one decode step of ``rows`` rows at cache depth ``position``: two per weight per row (the
    embedding is a lookup, not a product; a tied head counts once as the head), plus attention's scores
    and weighted sum over the cached positions."""
    shape = rollouts.model_shape(model)
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    matrices = sum(p.numel() for p in model.parameters() if p.dim() == 2 and p is not embedding)
    matrices += head.numel() if head is embedding else 0
    attention = 4 * shape["num_hidden_layers"] * shape["num_attention_heads"] * (
        shape.get("head_dim") or shape["hidden_size"] // shape["num_attention_heads"]) * position
    return rows * (2 * matrices + attention)


def roofline_s(model: torch.nn.Module, rows: int, first: int, last: int, read_gb_s: float,
               gemm_gflops: float) -> float:
    """The roofline of decode steps at cache depths ``first`` to ``last`` (inclusive), in seconds."""
    weights, kv = weight_bytes(model), kv_bytes_per_position(model)
    return sum(max((weights + rows * kv * p) / (read_gb_s * 1e9), decode_flops(model, rows, p) / (gemm_gflops * 1e9))
               for p in range(first, last + 1))


def _rollout_s(trainer: Any, batch: dict[str, torch.Tensor], tokens: int, device: torch.device,
               repeats: int) -> float:
    trainer.args.max_new_tokens = trainer.args.min_new_tokens = tokens
    times = []
    for _ in range(repeats):
        with trainer.shared_weights(trainer.model):
            sync(device)
            start = time.perf_counter()
            trainer.rollout(trainer.model, batch)
            sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _repeat_rows(batch: dict[str, torch.Tensor], times: int) -> dict[str, torch.Tensor]:
    return {k: v.repeat(times, *([1] * (v.dim() - 1))) if isinstance(v, torch.Tensor) else v
            for k, v in batch.items()}


def long_rollout_figures(teacher: torch.nn.Module, tokenizer: Any, cfg: TrainConfig, new_tokens: int,
                         max_length: int, steps: int, device: torch.device, ceilings: dict[str, float],
                         student_of: Any, batch_factors: tuple[int, ...] = (1, 2, 4),
                         matmuls: tuple[str, ...] | None = None) -> dict[str, Any]:
    """λ=0 and λ=1 steps at ``new_tokens`` rollouts and ``max_length`` chats (the exact form), and the
    rollout's decode steps against their roofline: at the run's batch in each eager fp32 form (``matmuls``;
    default: every one this torch build has), and at ``batch_factors`` times it in the fastest.
    ``student_of()``: a fresh student of the benchmark's settings."""
    if matmuls is None:
        matmuls = ("linear", "weight_major", "packed") if rollouts.packed_available() else ("linear", "weight_major")
    long = dataclasses.replace(cfg, max_length=max_length, max_new_tokens=new_tokens)
    features, _ = fixed_batch(tokenizer, cfg.dataset_name, cfg.per_device_train_batch_size, max_length,
                              cfg.min_completion_tokens)
    batch = to_device(DistillCollator(tokenizer.pad_token_id)(features), device)
    width = batch["prompt_ids"].shape[1]
    out: dict[str, Any] = {"new_tokens": new_tokens, "max_length": max_length, "shape": list(batch["input_ids"].shape),
                           "prompt_width": width, "timings": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for key, lmbda in (("ours_0", 0.0), ("ours_1", 1.0)):
            trainer = our_trainer(student_of(), teacher, tokenizer, long, device, tmp, lmbda=lmbda)
            out["timings"][key] = run_trainer(trainer, batch, steps, 0, device, "rollout",
                                              f"long rollouts, ours lambda={lmbda:g}").as_dict()
            del trainer
            release()
        out["lambda1_over_lambda0"] = out["timings"]["ours_1"]["median_s"] / out["timings"]["ours_0"]["median_s"]
        trainer = our_trainer(student_of(), teacher, tokenizer, long, device, tmp, lmbda=1.0)
        rows = batch["prompt_ids"].shape[0]

        def measure(trainer: Any, factor: int, matmul: str) -> dict[str, Any]:
            trainer.args.rollout_matmul = matmul
            wide = _repeat_rows(batch, factor)
            n = new_tokens if factor == 1 else min(new_tokens, 64)  # the larger batches: fewer tokens suffice
            one = _rollout_s(trainer, wide, 1, device, 2)
            full = _rollout_s(trainer, wide, n, device, 1)
            # A difference of two timings: where the decode steps are too short for the machine's timing noise
            # it can come out at or below zero, and is then reported as not measured.
            step = (full - one) / (n - 1) if full > one else None
            bound = roofline_s(trainer.model, rows * factor, width + 1, width + n - 1, ceilings["read_gb_s"],
                               ceilings["gemm_fp32_gflops"]) / (n - 1)
            return {"form": matmul, "rows": rows * factor, "tokens": n, "rollout_s": full, "decode_step_s": step,
                    "roofline_s": bound, "over_roofline": step / bound if step else None,
                    "tokens_per_s": rows * factor / step if step else None}

        # The run's batch in each eager exact-fp32 form ``auto`` chooses among, then the larger batches in the
        # fastest of them (the form a run on this machine would take, compiled forms aside).
        decode = [measure(trainer, 1, matmul) for matmul in matmuls]
        timed_forms = [d for d in decode if d["decode_step_s"] is not None]
        fastest = min(timed_forms, key=lambda d: d["decode_step_s"])["form"] if timed_forms else matmuls[0]
        decode += [measure(trainer, factor, fastest) for factor in batch_factors if factor != 1]
        out["decode"] = decode
        del trainer
        release()
    out["weights_mb"] = weight_bytes(teacher) / 1e6
    out["kv_kb_per_position"] = kv_bytes_per_position(teacher) / 1e3
    return out


def format_long(figures: dict[str, Any]) -> list[str]:
    """The long-rollout block of the report."""
    t = figures["timings"]
    lines = [f"(g) long rollouts: {figures['new_tokens']} new tokens, chats up to {figures['max_length']} tokens "
             f"(batch {figures['shape'][0]} x {figures['shape'][1]}, prompts {figures['prompt_width']} wide); "
             f"weights {figures['weights_mb']:.0f} MB, KV cache {figures['kv_kb_per_position']:.0f} kB per "
             "position and row",
             f"ours lambda=0 / lambda=1 step: {t['ours_0']['median_s']:.2f} / {t['ours_1']['median_s']:.2f} s "
             f"(rollout {t['ours_1']['parts_median_s'].get('rollout', 0):.2f} s); "
             f"lambda=1 / lambda=0 {figures['lambda1_over_lambda0']:.2f}",
             f"{'decode steps (fp32 forms)':<34}{'rows':>6}{'tokens':>8}{'step ms':>10}{'roofline ms':>13}"
             f"{'ratio':>8}{'target':>8}{'met':>5}{'tokens/s':>10}"]
    for d in figures["decode"]:
        form = _FORM_LABELS.get(d.get("form", "linear"), d.get("form"))
        label = (f"the run's batch, {form}" if d["rows"] == figures["shape"][0]
                 else f"  {d['rows'] // figures['shape'][0]} completions per prompt, {form}")
        if d["decode_step_s"] is None:
            lines.append(f"{label:<34}{d['rows']:>6}{d['tokens']:>8}  not measured: the rollout was within the "
                         "timing noise of a one-token rollout")
            continue
        met = "✓" if d["over_roofline"] <= TARGET_ROOFLINE else "✗"
        lines.append(f"{label:<34}{d['rows']:>6}{d['tokens']:>8}{d['decode_step_s'] * 1e3:>10.1f}"
                     f"{d['roofline_s'] * 1e3:>13.1f}{d['over_roofline']:>8.2f}{'<= ' + str(TARGET_ROOFLINE):>8}"
                     f"{met:>5}{d['tokens_per_s']:>10.1f}")
    return lines
