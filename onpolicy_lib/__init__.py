"""onpolicy-quant: on- vs off-policy distillation of a quantized student from its own teacher.

What a researcher uses in JupyterLab, in one namespace::

    import onpolicy_lib as opq

    run = opq.train(opq.TrainConfig(lmbda=1.0, max_steps=10))
    opq.evaluate_runs(opq.EvalConfig(run_dirs=[run.path], limit=20))
    df = opq.collect("outputs/cpu_protocol")

Names are imported on first use, so ``import onpolicy_lib`` stays instant and validating a
configuration never loads torch.

One module per concept: ``config`` (every parameter, declared once), ``rundir`` (the on-disk
layout of runs and sweeps), ``assets`` (offline model and data), ``data`` (chat datasets),
``models`` (loading), ``quantization`` (torchao QAT/PTQ and quantize-once), ``student``
(build/save/load), ``batches`` (the batch layout and rollouts), ``divergence`` (the generalized
JSD), ``distill`` (the GKD trainer), ``training`` (one run end to end), ``metrics`` (what a run
records), ``benchmarks``/``perplexity``/``fidelity`` (what evaluation measures), ``evaluate``
(students beside teacher and PTQ), ``sweep`` (the runner), ``results`` (outputs -> DataFrames),
``analysis`` (tables and statistics), ``plots`` (figures), ``speed`` (the step-cost benchmark).
"""

from __future__ import annotations

import importlib
from typing import Any

from onpolicy_lib._notices import silence_known_import_notices
from onpolicy_lib.cpu_threads import set_wait_policy

__version__ = "0.1.0"
# Before any submodule imports torch/torchao: their known import notices stay out of notebooks, and
# torch's OpenMP threads get a wait policy that suits the machine's load (cpu_threads; the notebooks
# the sweep runner starts inherit it).
silence_known_import_notices()
set_wait_policy()

_EXPORTS = {
    # configuration and runs
    "TrainConfig": "config", "EvalConfig": "config", "ConfigError": "config", "load_preset": "config",
    "Run": "rundir",
    # training
    "plan": "training", "train": "training", "run_summary": "metrics", "load_chat_dataset": "data",
    # evaluation and the deployed student
    "plan_evaluation": "evaluate", "evaluate_runs": "evaluate", "run_eval_notebook": "evaluate",
    "load_student": "student",
    "export_student": "student",
    # sweeps, results and analysis
    "expand": "sweep", "run_sweep": "sweep",
    "collect": "results", "per_example": "results", "per_example_fidelity": "results", "wide": "results",
    "condition_table": "analysis", "format_table": "analysis", "seed_level_interval": "analysis",
    "hierarchical_bootstrap": "analysis",
    "compute_table": "analysis", "with_average": "analysis", "varying": "analysis",
    "reference_study": "analysis", "gap_to_teacher": "analysis",
    "plot_training": "plots", "plot_eval": "plots", "save_figure": "plots",
}
_MODULES = ("analysis", "plots", "results", "config", "rundir", "generation_eval", "gen_tasks", "compute")

__all__ = sorted([*_EXPORTS, *_MODULES])


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"onpolicy_lib.{_EXPORTS[name]}"), name)
    elif name in _MODULES:
        value = importlib.import_module(f"onpolicy_lib.{name}")
    else:
        raise AttributeError(f"module 'onpolicy_lib' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
