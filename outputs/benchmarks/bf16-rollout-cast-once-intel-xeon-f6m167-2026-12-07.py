"""A/B: greedy rollouts of the INT4 g64 SmolLM2-135M-Instruct student under bf16 autocast (what a bf16 run's
rollouts run under), its fake-quantized weights materialised once, with autocast recasting every linear weight
at every token against the weights cast once (rollouts.cast_for_rollout(linear_only=True)). Batch 2, 64 new
tokens, 2 threads, three alternating repeats after a warm-up; prints the times and whether the tokens match.
Run with the machine otherwise idle:  .venv/bin/python outputs/benchmarks/bf16-rollout-cast-once-....py"""
import copy
import platform
import time

import torch

from onpolicy_lib.config import TrainConfig
from onpolicy_lib.metrics import machine_description
from onpolicy_lib.models import load_model, load_tokenizer
from onpolicy_lib.quantization import materialized_fake_quant, prepare_qat
from onpolicy_lib.rollouts import cast_for_rollout

torch.set_num_threads(2)
cfg = TrainConfig()
tok = load_tokenizer(cfg.model_name)
teacher = load_model(cfg.model_name).eval()
student = prepare_qat(copy.deepcopy(teacher), "int4", 64).eval()
prompt = tok(["Solve: what is 12 times 7, then add 5? Explain step by step."] * 2, return_tensors="pt")


def run(once: bool, n: int = 64) -> tuple[float, torch.Tensor]:
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16), materialized_fake_quant(student):
        with cast_for_rollout(student, torch.bfloat16, linear_only=True) if once else torch.no_grad():
            start = time.perf_counter()
            out = student.generate(**prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                   pad_token_id=tok.pad_token_id)
            return time.perf_counter() - start, out


print(machine_description(torch.device("cpu")), "| torch", torch.__version__, "| python", platform.python_version())
run(True, 8)
run(False, 8)
times: dict[bool, list[float]] = {True: [], False: []}
outputs: dict[bool, torch.Tensor] = {}
for _ in range(3):
    for once in (False, True):
        seconds, out = run(once)
        times[once].append(seconds)
        outputs.setdefault(once, out)
print("same tokens:", torch.equal(outputs[True], outputs[False]))
for once, found in times.items():
    print(f"{'cast once' if once else 'per-token recast'}: {', '.join(f'{t:.2f}' for t in found)} s "
          "for 64 tokens at batch 2")
print(f"per-token recast / cast once (best of each): {min(times[False]) / min(times[True]):.2f}x")
