# As run on 2026-11-27 from scratch directories: /work/probe (copies of the CPU demo run, caches, old_perplexity.py = onpolicy_lib/perplexity.py at ac87917) and /work/demo (a clone at ac87917 holding the demo run). Adjust the paths to rerun.
"""The speed benchmark's evaluation block, with the code before the evaluation work (stock) or after (new)."""
import os, sys, json, importlib.util, torch
from onpolicy_lib import quantization, benchmarks, evaluate, fidelity
from onpolicy_lib.config import TrainConfig
from onpolicy_lib.models import load_model, load_tokenizer
from onpolicy_lib.speed import student_evaluation
from onpolicy_lib.speed.report import _evaluation_lines
torch.set_num_threads(2)
mode = sys.argv[1]
if mode == "stock":
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import get_task_dict
    benchmarks.continuation_scorer = lambda: HFLM
    benchmarks.split_sizes = lambda tm, tasks: {n: len(t.eval_docs) for n, t in get_task_dict(benchmarks.leaf_tasks(tasks), tm).items()}
    spec = importlib.util.spec_from_file_location("old_perplexity", "/work/probe/old_perplexity.py")
    old = importlib.util.module_from_spec(spec); spec.loader.exec_module(old)
    evaluate.sliding_window_perplexity = old.sliding_window_perplexity
    fidelity.FidelityConfig.batch_order = "rows"
    import dataclasses
    # for_run builds new instances: default field value is what matters
    fidelity.FidelityConfig.__dataclass_fields__["batch_order"].default = "rows"
    fidelity.FidelityConfig.__init__.__defaults__ = tuple("rows" if d == "length" else d for d in fidelity.FidelityConfig.__init__.__defaults__)
name = "smollm2-135m-instruct"
cfg = TrainConfig(model_name=name)
tok = load_tokenizer(name); teacher = load_model(name).eval().requires_grad_(False)
gs = quantization.resolve_group_size(teacher, cfg.group_size)
e = student_evaluation(teacher, tok, cfg, gs, 20, torch.device("cpu"))
print(mode); print("\n".join(_evaluation_lines(e)))
json.dump(e, open(f"/work/probe/evalblock_{mode}.json", "w"), indent=1, default=str)
