# As run on 2026-11-27 from scratch directories: /work/probe (copies of the CPU demo run, caches, old_perplexity.py = onpolicy_lib/perplexity.py at ac87917) and /work/demo (a clone at ac87917 holding the demo run). Adjust the paths to rerun.
import sys, time, json
from onpolicy_lib.evaluate import EvalConfig, evaluate_runs
d = sys.argv[1]
t = time.time()
table = evaluate_runs(EvalConfig(run_dirs=[f"/work/probe/bf16/{d}/cpu-demo"], cache_dir=f"/work/probe/bf16/{d}/cache",
                                 dtype={"fp32": "float32", "bf16": "bfloat16"}[d], device="cpu"))
print(d, "seconds", time.time() - t)
print(table.round(4).to_string())
import json, statistics as st
def load(d):
    return json.load(open(f"/work/probe/bf16/{d}/cpu-demo/eval.json"))
a, b = load("fp32"), load("bf16")
old = json.load(open("/work/demo/outputs/cpu-demo/eval.json"))
for who, get in (("teacher", lambda e: e["baselines"]["teacher"]), ("ptq", lambda e: e["baselines"]["ptq"]), ("student", lambda e: e["student"])):
    x, y, z = get(a), get(b), get(old)
    print(f"== {who}: seconds fp32 {x['seconds']} bf16 {y['seconds']} (old fp32 {z['seconds']})")
    for t in x["benchmarks"]["tasks"]:
        sx = {(s.get('subject'), s["doc_id"]): s["acc"] for s in x["benchmarks"]["tasks"][t]["samples"]}
        sy = {(s.get('subject'), s["doc_id"]): s["acc"] for s in y["benchmarks"]["tasks"][t]["samples"]}
        sz = {(s.get('subject'), s["doc_id"]): s["acc"] for s in z["benchmarks"]["tasks"][t]["samples"]}
        flips = sum(sx[k] != sy[k] for k in sx); flips_old = sum(sx[k] != sz.get(k) for k in sx)
        print(f"  {t}: acc fp32 {x['benchmarks']['tasks'][t]['acc']:.3f} bf16 {y['benchmarks']['tasks'][t]['acc']:.3f} old {z['benchmarks']['tasks'][t]['acc']:.3f}; docs flipped bf16 {flips}/{len(sx)}, old-vs-new scorer {flips_old}")
    print(f"  perplexity fp32 {x['perplexity']['perplexity']:.3f} bf16 {y['perplexity']['perplexity']:.3f} old {z['perplexity']['perplexity']:.4f} new {x['perplexity']['perplexity']:.4f}")
    if "fidelity" in x:
        for m in ("forward_kl", "forward_kl_matched", "top1_agreement", "reverse_kl_on_policy", "teacher_nll_of_student_greedy"):
            print(f"  {m}: fp32 {x['fidelity'][m]:.4f} bf16 {y['fidelity'][m]:.4f} old {z['fidelity'][m]:.4f}")
