"""Where a training step's time goes: its matrix products against their GEMM bound, and everything else.

One extra step of a contender runs under ``torch.profiler`` (with FLOP counting for matrix products).
The profile's self times are CPU time summed over threads (the autograd engine has its own), and the
profiler slows a step, so the block reports *shares* of the profiled CPU time, scaled to the contender's
median step: the matrix products' share, their FLOPs over the measured GEMM rate of the step's compute
dtype (their bound), and the rest with its largest operators. A bf16 run computes its products in bf16
(accelerate's autocast); the rest (weight casts, fake quantization, the loss, the optimizer) is memory-
bound elementwise work that bf16 does not speed up in proportion.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_scaled_mm")


def profile_step(step: Callable[[], Any], top: int = 5) -> dict[str, Any]:
    """Run ``step`` once under the profiler: the matrix products' share of its CPU time, their FLOPs, and
    the ``top`` other operators by share."""
    import torch.profiler

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], with_flops=True) as prof:
        step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) or 1
    matmul = [e for e in events if e.key in MATMUL_OPS]
    others = sorted((e for e in events if e.key not in MATMUL_OPS), key=lambda e: -e.self_cpu_time_total)[:top]
    return {"matmul_share": sum(e.self_cpu_time_total for e in matmul) / total,
            "matmul_flops": float(sum(e.flops or 0 for e in matmul)),
            "top_other": [[e.key.removeprefix("aten::"), e.self_cpu_time_total / total] for e in others]}


def breakdown(profile: dict[str, Any], step_s: float, gemm_gflops: float | None) -> dict[str, Any]:
    """A profile scaled to a step's median time, against the GEMM rate (GFLOP/s) of its compute dtype."""
    matmul_s = profile["matmul_share"] * step_s
    bound = profile["matmul_flops"] / (gemm_gflops * 1e9) if gemm_gflops else None
    return {**profile, "step_s": step_s, "matmul_s": matmul_s, "other_s": step_s - matmul_s,
            "matmul_bound_s": bound, "matmul_over_bound": matmul_s / bound if bound else None}


def format_breakdown(figures: dict[str, dict[str, Any]]) -> list[str]:
    lines = ["(b') where a lambda=0 step's time goes: one profiled step's CPU-time shares scaled to the median step; "
             "the products' bound is their FLOPs over the measured GEMM rate of the step's dtype",
             f"{'step':<34}{'step s':>8}{'products s':>12}{'bound s':>9}{'ratio':>7}{'rest s':>8}  largest rest"]
    for label, b in figures.items():
        bound = f"{b['matmul_bound_s']:>9.2f}{b['matmul_over_bound']:>7.1f}" if b["matmul_bound_s"] else f"{'':>16}"
        rest = ", ".join(f"{name} {share:.0%}" for name, share in b["top_other"])
        lines.append(f"{label:<34}{b['step_s']:>8.2f}{b['matmul_s']:>12.2f}{bound}{b['other_s']:>8.2f}  {rest}")
    return lines
