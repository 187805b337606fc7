"""Analysis statistics against independent computations, and the analysis notebook on a synthetic tree."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import papermill as pm
import pytest

from onpolicy_lib import analysis, results
from onpolicy_lib.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
TASKS = ("hellaswag", "arc_easy", "arc_challenge", "winogrande", "mmlu")


def _model_result(rng: np.random.Generator, p: float, docs: int = 40) -> dict:
    tasks = {}
    for task in TASKS:
        correct = (rng.random(docs) < p).astype(float)
        samples = [{"doc_id": i, "acc": c, "acc_norm": c, **({"subject": "anatomy"} if task == "mmlu" else {})}
                   for i, c in enumerate(correct)]
        tasks[task] = {"acc": correct.mean(), "acc_stderr": correct.std(ddof=1) / np.sqrt(docs),
                       "acc_norm": correct.mean(), "acc_norm_stderr": 0.05, "n": docs, "samples": samples}
    return {"benchmarks": {"tasks": tasks}, "perplexity": {"perplexity": 40 / p},
            "fidelity": {"forward_kl": 1 - p, "top1_agreement": p, "reverse_kl_on_policy": 1 - p,
                         "teacher_nll_of_student_greedy": 1 - p / 2}, "seconds": 10.0}


def make_outputs(root: Path, sweep: str, grid: list[dict], seed: int = 0) -> None:
    """A synthetic evaluated sweep: run directories with config, metrics and eval files as runs write them."""
    rng = np.random.default_rng(seed)
    teacher = {"key": {"model_name": "m"}, **_model_result(rng, 0.6)}
    ptq = {"key": {"model_name": "m", "quant_type": "int4", "group_size": 64}, **_model_result(rng, 0.4)}
    manifest = {"name": sweep, "specs": ["x.yaml"], "runs": {}}
    for values in grid:
        cfg = TrainConfig(**values, do_eval=True).to_dict()
        name = "_".join(f"{k}-{v}" for k, v in values.items())
        run = root / sweep / name
        run.mkdir(parents=True)
        (run / "config.json").write_text(json.dumps({"train": cfg}))
        steps = [{"step": i, "loss": 1.0 / (i + 1) + values.get("lmbda", 0)} for i in range(10)]
        (run / "metrics.json").write_text(json.dumps({
            "steps": steps, "wall_time_s": 100 + 50 * values.get("lmbda", 0), "median_step_s": 1.0,
            "tokens_generated": 300 * values.get("lmbda", 0), "tokens_trained": 1000, "rollout_seconds": 5.0,
            "peak_memory_mb": 1.0, "heldout_loss_before": 0.1, "heldout_loss_after": 0.05}))
        p = 0.45 + 0.05 * values.get("lmbda", 0)
        (run / "eval.json").write_text(json.dumps({"student": _model_result(rng, p),
                                                   "baselines": {"teacher": teacher, "ptq": ptq}}))
        manifest["runs"][name] = {"spec": "x.yaml", "params": cfg, "varying": values}
    (root / sweep / "sweep.json").write_text(json.dumps(manifest))


def test_paired_bootstrap_matches_an_independent_computation():
    rng = np.random.default_rng(0)
    rows = []
    for task, n in (("hellaswag", 50), ("mmlu", 30)):
        for seed in (1, 2):
            for lmbda, p in ((0, 0.4), (1, 0.8)):
                for doc in range(n):
                    rows.append({"role": "student", "run": f"l{lmbda}s{seed}", "lmbda": lmbda, "seed": seed,
                                 "task": task, "subject": None, "doc_id": doc, "acc": float(rng.random() < p)})
    pe = pd.DataFrame(rows)
    res = analysis.paired_bootstrap(pe, {"lmbda": 0}, {"lmbda": 1}, n_boot=4000, seed=1)
    # Independent: per task, mean over seeds and documents, then the unweighted mean over tasks.
    acc = pe.groupby(["task", "lmbda"])["acc"].mean().unstack()
    assert res.delta == pytest.approx((acc[1] - acc[0]).mean())
    assert res.ci_low < res.delta < res.ci_high and res.documents == 80 and res.seeds_a == 2
    # The interval's half-width is about 1.96 standard errors of the macro-averaged paired difference.
    per_doc = pe.groupby(["task", "doc_id", "lmbda"])["acc"].mean().unstack()
    diff = (per_doc[1] - per_doc[0]).groupby("task")
    se = np.sqrt((diff.var(ddof=0) / diff.count()).sum()) / 2
    assert (res.ci_high - res.ci_low) / 2 == pytest.approx(1.96 * se, rel=0.15)
    assert res.significant and res.p_value < 0.05 and "Significant" in res.verdict()
    same = analysis.paired_bootstrap(pe, {"lmbda": 0}, {"lmbda": 0}, n_boot=500)
    assert same.delta == 0 and same.p_value == 1.0 and "Not significant" in same.verdict()
    with pytest.raises(ValueError, match="no per-example results"):
        analysis.paired_bootstrap(pe, {"lmbda": 0}, {"lmbda": 0.5})


def test_condition_table_and_collection(tmp_path):
    make_outputs(tmp_path, "s", [{"lmbda": lm, "seed": sd} for lm in (0, 1) for sd in (1, 2, 3)])
    df = results.collect(tmp_path)
    assert {"sweep", "run", "role", "status", "metric", "value", "stderr", "lmbda", "learning_rate"} <= set(df)
    assert set(df["role"]) == {"student", "teacher", "ptq"}
    assert df[df["role"] == "teacher"]["run"].unique().tolist() == ["teacher"]  # once, not once per run
    w = analysis.with_average(results.wide(df))
    table = analysis.condition_table(w)
    assert list(table.index) == ["teacher (fp32)", "PTQ int4 g64", "λ=0", "λ=1"]
    students = w[(w["role"] == "student") & (w["lmbda"] == 1)]
    assert table.loc["λ=1", ("average", "mean")] == pytest.approx(students["average"].mean())
    assert table.loc["λ=1", ("mmlu/acc", "sd")] == pytest.approx(students["mmlu/acc"].std(ddof=1))
    assert table.loc["λ=1", ("average", "n")] == 3
    expected_avg = np.mean([students.iloc[0][f"{t}/acc"] for t in TASKS])
    assert students.iloc[0]["average"] == pytest.approx(expected_avg)
    pe = results.per_example(tmp_path)
    assert len(pe) == (6 + 2) * 5 * 40  # six students and two baselines, five tasks, forty documents
    gaps = analysis.gap_to_teacher(w)
    assert set(gaps["study"]) == {"this tool (SmolLM2-135M, CPU)", "original (Qwen3-4B, 10k GPU steps)"}


def test_reference_data_is_the_published_table():
    ref = analysis.reference_study()
    main = ref[ref["table"] == "main"].set_index("lmbda")
    assert main.loc[1.0, "mmlu"] == 0.686 and main.loc[0.0, "hellaswag"] == 0.515
    assert ref[ref["model"] == "teacher"]["mmlu"].item() == 0.707
    assert set(ref["table"]) == {"baseline", "main", "learning_rate", "beta", "batch_size", "rollout_length"}


def test_analysis_notebook_renders_every_section(tmp_path):
    make_outputs(tmp_path, "seeds", [{"lmbda": lm, "seed": sd} for lm in (0, 1) for sd in (1, 2)])
    make_outputs(tmp_path, "lr", [{"lmbda": lm, "learning_rate": lr, "max_steps": st} for lm in (0, 1)
                                  for lr in (1e-5, 1e-4) for st in (10, 20)], seed=1)
    out = tmp_path / "analysis.ipynb"
    pm.execute_notebook(str(ROOT / "notebooks" / "analysis.ipynb"), str(out), cwd=str(ROOT), progress_bar=False,
                        parameters={"outputs": [str(tmp_path)], "figures_dir": str(tmp_path / "fig"),
                                    "n_boot": 500})
    text = out.read_text()
    assert "paired documents" in text and "varies: lmbda, learning_rate, max_steps" in text
    for name in ("main_comparison", "lr_learning_rate", "lr_extended_training", "compute_cost", "seeds_bootstrap",
                 "distribution_mismatch", "gap_to_teacher_vs_original"):
        for ext in ("png", "svg"):
            assert (tmp_path / "fig" / f"{name}.{ext}").stat().st_size > 0, name
