"""The wait-policy probe behind wait-policy-intel-xeon-f6m167-2026-12-07.txt: the contention block's child
(a λ=0 step and 2 x 32 tokens of greedy decoding) under each OpenMP environment, alone and beside a busy
loop pinned to cpu 1. Run from the repository root: python outputs/benchmarks/wait-policy-...py [variant ...]
(variant:alone times it alone only). The probe ran this child from a scratch copy of
onpolicy_lib/speed/contention.py identical in its child."""
import json
import os
import subprocess
import sys
import time

VARIANTS = {"passive": {"OMP_WAIT_POLICY": "PASSIVE"}, "runtime": {},
            **{f"spin{n // 1000}k": {"GOMP_SPINCOUNT": str(n)} for n in (1000, 3000, 10000, 30000, 100000)}}
base = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "KMP_BLOCKTIME", "GOMP_SPINCOUNT")}
spec = json.dumps({"train": {}, "steps": 2})
for arg in sys.argv[1:] or list(VARIANTS):
    name, _, only = arg.partition(":")
    for busy in (False,) if only == "alone" else (False, True):
        env = {**base, "ONPOLICY_QUANT_WAIT": "runtime", "ONPOLICY_QUANT_THREADS": "2", **VARIANTS[name]}
        loop = None
        if busy:
            loop = subprocess.Popen([sys.executable, "-c", "while True: pass"])
            os.sched_setaffinity(loop.pid, {1})
            time.sleep(0.5)
        start = time.time()
        try:
            done = subprocess.run([sys.executable, "-m", "onpolicy_lib.speed.contention", spec], capture_output=True,
                                  text=True, env=env, timeout=900)
        finally:
            if loop:
                loop.kill()
                loop.wait()
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        result = json.loads(lines[-1]) if lines else {"error": done.stderr[-500:]}
        print(name, "busy" if busy else "alone", round(time.time() - start),
              {k: result.get(k) for k in ("step", "decode", "step_seconds", "decode_seconds", "wait_policy", "error")},
              flush=True)
