"""The machine's ceilings, and a decode step measured against them.

A step's ratio to our own floor says nothing about how close the floor is to the hardware. These
measure what the hardware can do (memory read bandwidth, GEMM throughput in float32 and bfloat16)
and one cached decode step of the rollout batch in each of its forms (:data:`DECODE_FORMS`), whose
lower bound is reading every weight it uses once at that bandwidth (its arithmetic is a few hundred
MFLOP: memory, not compute, bounds it).
"""

from __future__ import annotations

import statistics
import time
from typing import NamedTuple

import torch

from onpolicy_lib.compiled_rollouts import CompiledSampler
from onpolicy_lib.rollouts import weight_major_forward
from onpolicy_lib.speed.timing import sync, timed

_READ_BYTES = 512 * 2**20  # well past any CPU's last-level cache


class DecodeForm(NamedTuple):
    """A form a rollout's decode step can take, its settings as TrainConfig names them."""

    key: str
    label: str
    rollout_dtype: str
    rollout_matmul: str
    rollout_compile: bool = False


# The first is the default, exact one.
DECODE_FORMS: tuple[DecodeForm, ...] = (
    DecodeForm("fp32", "fp32 weights", "float32", "linear"),
    DecodeForm("fp32_wm", "fp32 weights, weight-major", "float32", "weight_major"),
    DecodeForm("fp32_pk", "fp32 weights, packed (oneDNN)", "float32", "packed"),
    DecodeForm("bf16", "bf16 weights", "bfloat16", "linear"),
    DecodeForm("bf16_wm", "bf16 weights, weight-major", "bfloat16", "weight_major"),
    DecodeForm("fp32_wm_compiled", "fp32, weight-major, compiled", "float32", "weight_major", True),
)


@torch.no_grad()
def ceilings(device: torch.device, gemm_shape: tuple[int, int, int] = (512, 2048, 2048),
             repeats: int = 5) -> dict[str, float]:
    """Memory read bandwidth (GB/s, a sum over 512 MiB) and GEMM throughput (GFLOP/s) in fp32 and bf16."""
    data = torch.ones(_READ_BYTES // 4, device=device)

    def read() -> None:
        data.sum()

    out = {"read_gb_s": _READ_BYTES / timed(read, repeats, 2, device).median / 1e9}
    m, k, n = gemm_shape
    for dtype, key in ((torch.float32, "gemm_fp32_gflops"), (torch.bfloat16, "gemm_bf16_gflops")):
        a, b = torch.randn(m, k, device=device, dtype=dtype), torch.randn(k, n, device=device, dtype=dtype)

        def product(a: torch.Tensor = a, b: torch.Tensor = b) -> None:
            a @ b

        out[key] = 2 * m * k * n / timed(product, repeats, 2, device).median / 1e9
    return out


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the distinct parameters a forward reads (tied matrices once)."""
    seen: dict[int, int] = {}
    for p in model.parameters():
        seen[id(p)] = p.numel() * p.element_size()
    return sum(seen.values())


@torch.no_grad()
def decode_step(model: torch.nn.Module, prompt_ids: torch.Tensor, attention_mask: torch.Tensor,
                device: torch.device, steps: int = 8) -> float:
    """Median seconds of one cached decode step (all rows, one new token each) after the prompt's prefill."""
    out = model(input_ids=prompt_ids, attention_mask=attention_mask, use_cache=True)
    cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    mask = attention_mask
    times = []
    for _ in range(steps + 1):
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        sync(device)
        start = time.perf_counter()
        out = model(input_ids=token, attention_mask=mask, past_key_values=cache, use_cache=True)
        sync(device)
        times.append(time.perf_counter() - start)
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    return statistics.median(times[1:])  # the first step after prefill is a warm-up


@torch.no_grad()
def compiled_decode_step(model: torch.nn.Module, prompt_ids: torch.Tensor, attention_mask: torch.Tensor,
                         device: torch.device, dtype: torch.dtype, weight_major: bool, steps: int = 8,
                         repeats: int = 3) -> tuple[float, float]:
    """Seconds of one compiled decode step (:class:`~onpolicy_lib.compiled_rollouts.CompiledSampler`,
    sampling included), and the seconds its compilation took.

    A step's time is the difference between sampling ``steps + 1`` tokens and one (the prefill and
    the first token alone), medians over ``repeats``, divided by ``steps``; no row ends early.
    """
    sampler = CompiledSampler(model, dtype, prompt_ids.shape[1] + steps + 1,
                              linear_forward=weight_major_forward if weight_major else None)
    sampler.refresh(model)

    def sample(tokens: int) -> float:
        sync(device)
        start = time.perf_counter()
        sampler.sample(prompt_ids, attention_mask, eos_token_ids=[], pad_token_id=0, temperature=1.0,
                       max_new_tokens=tokens)
        sync(device)
        return time.perf_counter() - start

    first = sample(2)  # its decode step compiles
    compile_s = first - sample(2)
    long = statistics.median(sample(steps + 1) for _ in range(repeats))
    short = statistics.median(sample(1) for _ in range(repeats))
    return (long - short) / steps, compile_s
