"""Where a batched generation decode step's time goes, against its bounds, and what the kernels underneath can do.

1. In situ: greedy generation of 32 held-out prompts with the packaged model (fp32), 160 new tokens each;
   torch.profiler over the last 10 decode steps (about 300 cached positions): matrix products, attention,
   everything else, each per step, beside the step's roofline (speed.generation.decode_step_bound).
2. The matrix products alone at the model's shapes for 2, 8 and 32 rows: F.linear (MKL sgemm, what the
   model runs) against MKL's prepacked-weight GEMM (torch.ops.mkl._mkl_linear, what inductor's freezing
   uses), with the largest difference from F.linear. Weights are cycled through several copies so they
   are not cache-resident (the head is larger than any cache).
3. Attention alone for 32 rows at 300 positions (9 query heads on 3 key/value heads, head dim 64) over 30
   layers' caches (cold): scaled_dot_product_attention as the model calls it (grouped queries packed,
   boolean mask), with a float mask, without a mask, and as two matmuls, against reading the keys and
   values once.
Run with the machine otherwise idle:  .venv/bin/python outputs/benchmarks/generation-breakdown-....py"""
import time

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from onpolicy_lib import data
from onpolicy_lib.assets import PACKAGED_MODEL
from onpolicy_lib.generation import GenerationStats, encode_prompts, generate_ids
from onpolicy_lib.metrics import machine_description
from onpolicy_lib.models import load_model, load_tokenizer
from onpolicy_lib.speed.generation import decode_step_bound, model_shape
from onpolicy_lib.speed.hardware import ceilings

torch.set_num_threads(2)
device = torch.device("cpu")
limits = ceilings(device)
bw, gemm = limits["read_gb_s"], limits["gemm_fp32_gflops"]
print(f"{machine_description(device)}; read {bw:.1f} GB/s, GEMM fp32 {gemm:.0f} GFLOP/s")

# 1. In situ
rows, new = 32, 160
tok = load_tokenizer(PACKAGED_MODEL)
model = load_model(PACKAGED_MODEL, device=device, dtype=torch.float32).eval()
shape = model_shape(model)
_, heldout = data.load_chat_dataset(data.OFFLINE_MIXTURE)
chats = [m[:-1] for m in data.stratified_sample(heldout, 64)["messages"]]
ids = sorted(encode_prompts(tok, chats), key=len)[16:16 + rows]
width = max(map(len, ids))
generate_ids(model, ids[:2], max_new_tokens=4, eos_token_ids=[], pad_token_id=0)
stats = GenerationStats()
generate_ids(model, ids, max_new_tokens=new, eos_token_ids=[], pad_token_id=0, batch_size=rows, stats=stats)
print(f"\n1. {rows} prompts (widest {width} tokens), {new} new tokens: decode {stats.decode_s:.2f} s, "
      f"{1e3 * stats.decode_s / (new - 1):.1f} ms a step on average")
profiled = 10
calls = {"n": 0}
forward = model.forward
prof = profile(activities=[ProfilerActivity.CPU])


def counting_forward(*args, **kwargs):
    calls["n"] += 1
    if calls["n"] == new - profiled:
        prof.__enter__()
    return forward(*args, **kwargs)


model.forward = counting_forward
generate_ids(model, ids, max_new_tokens=new, eos_token_ids=[], pad_token_id=0, batch_size=rows)
prof.__exit__(None, None, None)
model.forward = forward
events = {e.key: e.self_cpu_time_total / 1e3 for e in prof.key_averages()}
total = sum(events.values()) / profiled
mm = events.get("aten::mm", 0) / profiled
attention = sum(v for k, v in events.items() if "scaled_dot_product" in k) / profiled
positions = width + new - profiled // 2
bound = decode_step_bound(shape, rows, rows * positions, bw, gemm) * 1e3
weights_s = shape.weight_bytes / bw / 1e6
kv_s = rows * positions * shape.kv_bytes_per_position / bw / 1e6
flops_s = 2 * rows * shape.linear_params / gemm / 1e6
print(f"   profiled step (profiler overhead included) at ~{positions} cached positions a row (left padding included): {total:.1f} ms = matrix products {mm:.1f} + attention "
      f"{attention:.1f} + other {total - mm - attention:.1f}")
print(f"   bounds: step {bound:.1f} ms (weights {weights_s:.1f} + cache {kv_s:.1f} ms of reading; linear FLOPs "
      f"{flops_s:.1f} ms at the GEMM rate); step / bound {total / bound:.2f}; products / max(weights, FLOPs) "
      f"{mm / max(weights_s, flops_s):.2f}; attention / cache read {attention / kv_s:.2f}")


# 2. GEMMs
def timed(fn, n=30):
    for _ in range(3):
        fn()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n * 1e3


def gemm_times(m: int, n: int, k: int, copies: int) -> tuple[float, float, float]:
    """ms of F.linear and of the prepacked GEMM for [m, k] x [n, k]^T, and their largest difference."""
    weights = [torch.randn(n, k) for _ in range(copies)]
    packed = [torch.ops.mkl._mkl_reorder_linear_weight(w, m) for w in weights]
    x = torch.randn(m, k)
    cycle = iter(range(10**9))
    a = timed(lambda: F.linear(x, weights[next(cycle) % copies]))
    b = timed(lambda: (lambda j: torch.ops.mkl._mkl_linear(x, packed[j], weights[j], None, m))(next(cycle) % copies))
    diff = (F.linear(x, weights[0]) - torch.ops.mkl._mkl_linear(x, packed[0], weights[0], None, m)).abs().max()
    return a, b, diff.item()


shapes = {"q, o": (576, 576, 2), "k, v": (192, 576, 2), "gate, up": (1536, 576, 2), "down": (576, 1536, 1),
          "head": (49152, 576, 0)}
print("\n2. matrix products per step (30 layers + head), ms; per shape: F.linear / prepacked ms (GFLOP/s)")
for m in (2, 8, 32):
    totals = {"linear": 0.0, "packed": 0.0}
    parts = []
    worst = 0.0
    for name, (n, k, per_layer) in shapes.items():
        a, b, diff = gemm_times(m, n, k, 2 if name == "head" else 16)
        worst = max(worst, diff)
        times = per_layer * 30 or 1
        totals["linear"] += a * times
        totals["packed"] += b * times
        flop = 2 * m * n * k / 1e6
        parts.append(f"{name} {a:.3f} ({flop / a:.0f}) / {b:.3f} ({flop / b:.0f})")
    print(f"   {m:>2} rows: F.linear {totals['linear']:.1f} ms, prepacked {totals['packed']:.1f} ms "
          f"(largest difference {worst:.1e}); " + "; ".join(parts))

# 3. Attention
b_, h, hk, d, length, capacity, layers = 32, 9, 3, 64, 300, 500, 30
keys = [torch.randn(b_, hk, capacity, d) for _ in range(layers)]
values = [torch.randn(b_, hk, capacity, d) for _ in range(layers)]
q = torch.randn(b_, hk, h // hk, d)
mask = torch.ones(b_, 1, 1, length, dtype=torch.bool)
mask[:5, ..., :40] = False
float_mask = torch.zeros(b_, 1, 1, length).masked_fill(~mask, float("-inf"))


def attention_pass(kind):
    for layer in range(layers):
        k, v = keys[layer][:, :, :length], values[layer][:, :, :length]
        if kind == "sdpa, boolean mask (the model's call)":
            F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=d ** -0.5)
        elif kind == "sdpa, float mask":
            F.scaled_dot_product_attention(q, k, v, attn_mask=float_mask, scale=d ** -0.5)
        elif kind == "sdpa, no mask":
            F.scaled_dot_product_attention(q, k, v, scale=d ** -0.5)
        else:
            scores = torch.matmul(q, k.transpose(-1, -2)).mul_(d ** -0.5).add_(float_mask)
            torch.matmul(torch.softmax(scores, -1), v)


read_ms = 2 * b_ * hk * length * d * 4 * layers / bw / 1e6
print(f"\n3. attention, {b_} rows x {length} positions, 30 layers (cold caches); reading the keys and values once: "
      f"{read_ms:.1f} ms")
for kind in ("sdpa, boolean mask (the model's call)", "sdpa, float mask", "sdpa, no mask", "two matmuls"):
    ms = timed(lambda kind=kind: attention_pass(kind), n=5)
    print(f"   {kind}: {ms:.1f} ms ({ms / read_ms:.2f}x the read)")
