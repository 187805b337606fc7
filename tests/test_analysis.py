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
T = "teacher (precision not recorded)"  # the synthetic teacher records no precision


def _model_result(rng: np.random.Generator, p: float, docs: int = 40) -> dict:
    tasks = {}
    for task in TASKS:
        correct = (rng.random(docs) < p).astype(float)
        samples = [{"doc_id": i, "acc": c, "acc_norm": c, **({"subject": "anatomy"} if task == "mmlu" else {})}
                   for i, c in enumerate(correct)]
        tasks[task] = {"acc": correct.mean(), "acc_stderr": correct.std(ddof=1) / np.sqrt(docs),
                       "acc_norm": correct.mean(), "acc_norm_stderr": 0.05, "n": docs, "samples": samples}
    per_example = [{"id": f"h{i}", "source": "math" if i % 2 else "code", "forward_kl": 1 - p + rng.normal(0, 0.05),
                    "forward_kl_matched": 1 - p, "top1_agreement": p, "reverse_kl_on_policy": 1 - p,
                    "teacher_nll_of_student_greedy": 1 - p / 2} for i in range(12)]
    return {"benchmarks": {"tasks": tasks}, "perplexity": {"perplexity": 40 / p},
            "fidelity": {"forward_kl": 1 - p, "top1_agreement": p, "reverse_kl_on_policy": 1 - p,
                         "teacher_nll_of_student_greedy": 1 - p / 2, "per_example": per_example}, "seconds": 10.0}


def make_outputs(root: Path, sweep: str, grid: list[dict], seed: int = 0, calibrated: bool = False) -> None:
    """A synthetic evaluated sweep: run directories with config, metrics and eval files as runs write them."""
    rng = np.random.default_rng(seed)
    teacher = {"key": {"model_name": "m"}, **_model_result(rng, 0.6)}
    manifest = {"name": sweep, "specs": ["x.yaml"], "runs": {}}
    calibrations: dict[str, dict] = {}
    for values in grid:
        # A rung further from the teacher (fewer bits) puts its PTQ model further away too.
        q = values.get("quant_type", "int4")
        far = {"int8": 0.0, "int4": 0.05, "int3": 0.1, "int2": 0.2}[q]
        ptq = {"key": {"model_name": "m", "quant_type": q, "group_size": 64},
               **_model_result(np.random.default_rng(seed + int(q[3:])), 0.4 - far)}
        scheme = {"model_name": "m", "scheme": {"quant_type": q, "group_size": 64, "head": "full precision"}}
        # A baseline is evaluated once and cached: every run of a rung carries the same result.
        extra = calibrations.setdefault(q, {m: {"key": {**scheme, "method": m}, **_model_result(rng, 0.42)}
                                            for m in ("gptq", "awq")}) if calibrated else {}
        cfg = TrainConfig(**values, do_eval=True).to_dict()
        name = "_".join(f"{k}-{v}" for k, v in values.items())
        run = root / sweep / name
        run.mkdir(parents=True)
        (run / "config.json").write_text(json.dumps({"train": cfg}))
        steps = [{"step": i, "loss": 1.0 / (i + 1) + values.get("lmbda", 0)} for i in range(10)]
        (run / "metrics.json").write_text(json.dumps({
            "steps": steps, "wall_time_s": 100 + 50 * values.get("lmbda", 0), "median_step_s": 1.0,
            "tokens_generated": 300 * values.get("lmbda", 0), "tokens_trained": 1000, "rollout_seconds": 5.0,
            "peak_memory_mb": 1.0, "heldout_loss_before": 0.1, "heldout_loss_after": 0.05,
            "heldout_curve": [{"step": s, "loss": 0.1 / (1 + s)} for s in (0, 5, 10)]}))
        p = 0.45 + 0.05 * values.get("lmbda", 0) * (1 + 10 * far)  # on-policy's edge grows down the ladder
        (run / "eval.json").write_text(json.dumps({"student": _model_result(rng, p),
                                                   "baselines": {"teacher": teacher, "ptq": ptq, **extra}}))
        manifest["runs"][name] = {"spec": "x.yaml", "params": cfg, "varying": values}
    (root / sweep / "sweep.json").write_text(json.dumps(manifest))


def test_document_bootstrap_matches_an_independent_computation():
    rng = np.random.default_rng(0)
    rows = []
    for task, n in (("hellaswag", 50), ("mmlu", 30)):
        for seed in (1, 2):
            for lmbda, p in ((0, 0.4), (1, 0.8)):
                for doc in range(n):
                    rows.append({"role": "student", "run": f"l{lmbda}s{seed}", "lmbda": lmbda, "seed": seed,
                                 "task": task, "subject": None, "doc_id": doc, "acc": float(rng.random() < p)})
    pe = pd.DataFrame(rows)
    res = analysis.hierarchical_bootstrap(pe, {"lmbda": 0}, {"lmbda": 1}, n_boot=4000, seed=1, resample_seeds=False)
    # Independent: per task, mean over seeds and documents, then the unweighted mean over tasks.
    acc = pe.groupby(["task", "lmbda"])["acc"].mean().unstack()
    assert res.delta == pytest.approx((acc[1] - acc[0]).mean())
    assert res.ci_low < res.delta < res.ci_high and res.documents == 80 and res.seeds_a == 2
    # The interval's half-width is about 1.96 standard errors of the macro-averaged paired difference.
    per_doc = pe.groupby(["task", "doc_id", "lmbda"])["acc"].mean().unstack()
    diff = (per_doc[1] - per_doc[0]).groupby("task")
    se = np.sqrt((diff.var(ddof=0) / diff.count()).sum()) / 2
    assert (res.ci_high - res.ci_low) / 2 == pytest.approx(1.96 * se, rel=0.15)
    assert analysis.excludes_zero(res.ci_low, res.ci_high) and res.p_value < 0.05
    same = analysis.hierarchical_bootstrap(pe, {"lmbda": 0}, {"lmbda": 0}, n_boot=500, resample_seeds=False)
    assert same.delta == 0 and same.p_value == 1.0 and not same.resolved
    with pytest.raises(ValueError, match="no per-example results"):
        analysis.hierarchical_bootstrap(pe, {"lmbda": 0}, {"lmbda": 0.5})


def test_condition_table_and_collection(tmp_path):
    make_outputs(tmp_path, "s", [{"lmbda": lm, "seed": sd} for lm in (0, 1) for sd in (1, 2, 3)])
    df = results.collect(tmp_path)
    assert {"sweep", "run", "role", "status", "metric", "value", "stderr", "lmbda", "learning_rate"} <= set(df)
    assert set(df["role"]) == {"student", "teacher", "ptq"}
    assert df[df["role"] == "teacher"]["run"].unique().tolist() == [T]  # once, not once per run
    w = analysis.with_average(results.wide(df))
    table = analysis.condition_table(w)
    assert list(table.index) == [T, "PTQ int4 g64", "λ=0", "λ=1"]
    students = w[(w["role"] == "student") & (w["lmbda"] == 1)]
    assert table.loc["λ=1", ("average", "mean")] == pytest.approx(students["average"].mean())
    assert table.loc["λ=1", ("mmlu/acc", "sd")] == pytest.approx(students["mmlu/acc"].std(ddof=1))
    assert table.loc["λ=1", ("average", "n")] == 3
    expected_avg = np.mean([students.iloc[0][f"{t}/acc"] for t in TASKS])
    assert students.iloc[0]["average"] == pytest.approx(expected_avg)
    pe = results.per_example(tmp_path)
    assert len(pe) == (6 + 2) * 5 * 40  # six students and two baselines, five tasks, forty documents
    gaps = analysis.gap_to_teacher(w)
    assert set(gaps["study"]) == {"this tool (m, CPU)", "original (Qwen3-4B, 10k GPU steps)"}


def test_a_resumed_runs_wall_time_is_left_out(tmp_path):
    """Its clock covers the last attempt only; its counters and FLOPs (summed over attempts) stay."""
    make_outputs(tmp_path, "s", [{"lmbda": 0, "seed": sd} for sd in (1, 2)])
    resumed = sorted((tmp_path / "s").glob("*/metrics.json"))[1]
    metrics = json.loads(resumed.read_text())
    metrics.update({"resumed_from": "checkpoint-50", "wall_time_s": 5.0, "flops": 1e12})
    resumed.write_text(json.dumps(metrics))
    w = results.wide(results.collect(tmp_path))
    students = w[w["role"] == "student"].set_index("run")
    assert pd.isna(students.loc[resumed.parent.name, "wall_time_s"])
    assert students.loc[resumed.parent.name, "flops"] == 1e12
    assert students["wall_time_s"].notna().sum() == 1


def test_calibrated_baselines_take_their_place_in_tables_and_colours(tmp_path):
    from onpolicy_lib import plots

    make_outputs(tmp_path, "s", [{"lmbda": lm, "seed": sd} for lm in (0, 1) for sd in (1, 2)], calibrated=True)
    w = analysis.with_average(results.wide(results.collect(tmp_path)))
    table = analysis.condition_table(w)
    assert list(table.index) == [T, "PTQ int4 g64", "GPTQ int4 g64", "AWQ int4 g64", "λ=0", "λ=1"]
    assert table.loc["GPTQ int4 g64", ("average", "n")] == 1  # once per sweep, not once per run
    colors = plots.condition_colors(table.index)
    assert colors["PTQ int4 g64"] == plots.PTQ_COLOR
    assert len({colors[k] for k in ("PTQ int4 g64", "GPTQ int4 g64", "AWQ int4 g64")}) == 3  # shades of it
    fidelity = results.per_example_fidelity(tmp_path)
    assert {"student", "ptq", "gptq", "awq"} == set(fidelity["role"])


def test_the_ladder_compares_lambda_per_rung_against_the_ptq_distance(tmp_path):
    from onpolicy_lib import plots

    make_outputs(tmp_path, "ladder", [{"seed": sd, "quant_type": q, "lmbda": lm} for sd in (1, 2)
                                      for q in ("int8", "int4", "int2") for lm in (0, 1)], calibrated=True)
    w = analysis.with_average(results.wide(results.collect(tmp_path)))
    students = w[w["role"] == "student"]
    pe, pef = results.per_example(tmp_path), results.per_example_fidelity(tmp_path)
    effects = analysis.ladder_effects(pe, pef, students, n_boot=300)
    assert list(dict.fromkeys(effects["quant_type"])) == ["int8", "int4", "int2"]  # nearest the teacher first
    for q in ("int8", "int2"):
        row = effects[(effects["quant_type"] == q) & (effects["metric"] == "forward_kl")].iloc[0]
        direct = pef[(pef["quant_type"] == q) & (pef["metric"] == "forward_kl")]
        by = direct[direct["role"] == "student"].groupby("lmbda")["value"].mean()
        assert row["delta"] == pytest.approx(by[1] - by[0])
        assert row["ptq_forward_kl"] == pytest.approx(direct[direct["role"] == "ptq"]["value"].mean())
    distance = effects.groupby("quant_type")["ptq_forward_kl"].first()
    assert distance["int8"] < distance["int4"] < distance["int2"]
    table = analysis.ladder_table(w)
    assert list(table.loc["int2"].index) == [T, "PTQ int2 g64", "GPTQ int2 g64", "AWQ int2 g64", "λ=0", "λ=1"]
    assert table.loc[("int4", "λ=1"), ("forward_kl", "n")] == 2
    fig = plots.plot_ladder(effects, analysis.FIDELITY_NAMES)
    assert len([ax for ax in fig.axes if ax.get_visible()]) == effects["metric"].nunique()


def test_a_baselines_only_rung_is_read_beside_the_rungs_with_students(tmp_path):
    make_outputs(tmp_path, "ladder", [{"seed": 1, "quant_type": q, "lmbda": lm} for q in ("int4", "int2")
                                      for lm in (0, 1)], calibrated=True)
    # What `sweep --baselines-only int8` writes beside the manifest: eval.json's baselines, no student.
    rng = np.random.default_rng(8)
    teacher = json.loads(next((tmp_path / "ladder").glob("*/eval.json")).read_text())["baselines"]["teacher"]
    scheme = {"model_name": "m", "scheme": {"quant_type": "int8", "group_size": 64, "head": "full precision"}}
    record = {"baselines": {"teacher": teacher, "ptq": {"key": scheme, **_model_result(rng, 0.59)},
                            "gptq": {"key": {**scheme, "method": "gptq"}, **_model_result(rng, 0.6)}}}
    (tmp_path / "ladder" / "baselines-int8.json").write_text(json.dumps(record))
    df = results.collect(tmp_path)
    assert df[df["role"] == "teacher"]["run"].unique().tolist() == [T]  # once, not again from the record
    w = analysis.with_average(results.wide(df))
    table = analysis.ladder_table(w)
    assert list(dict.fromkeys(table.index.get_level_values(0))) == ["int8", "int4", "int2"]
    assert list(table.loc["int8"].index) == [T, "PTQ int8 g64", "GPTQ int8 g64"]
    assert table.loc[("int8", "PTQ int8 g64"), ("perplexity", "mean")] == pytest.approx(40 / 0.59)
    pe, pef = results.per_example(tmp_path), results.per_example_fidelity(tmp_path)
    assert len(pe[pe["run"] == "PTQ int8 g64"]) == 5 * 40 and len(pe[pe["role"] == "teacher"]) == 5 * 40
    int8 = pef[pef["quant_type"] == "int8"]
    assert set(int8["role"]) == {"ptq", "gptq"} and len(int8) == 2 * 12 * 5  # 12 chats, 5 metrics each
    # The rungs with students are compared as before; the int8 rung has no λ to compare.
    effects = analysis.ladder_effects(pe, pef, w[w["role"] == "student"], n_boot=200)
    assert list(dict.fromkeys(effects["quant_type"])) == ["int4", "int2"]
    assert results.find_baseline_records(tmp_path, "other")[0][0] == "other"


def test_the_original_recipes_sit_under_their_own_bit_width():
    key = {"recipe": {"algorithm": "awq", "bits": 4, "group_size": 128, "preset": "W4A16_ASYM"},
           "label": "AWQ W4A16_ASYM g128 (original recipe)"}
    assert results.baseline_grid({"key": key}) == {"quant_type": "int4", "group_size": 128}
    assert results.calibrated_label("awq-original", {"key": key}) == "AWQ W4A16_ASYM g128 (original recipe)"


def test_reference_data_is_the_published_table():
    ref = analysis.reference_study()
    main = ref[ref["table"] == "main"].set_index("lmbda")
    assert main.loc[1.0, "mmlu"] == 0.686 and main.loc[0.0, "hellaswag"] == 0.515
    assert ref[ref["model"] == "teacher"]["mmlu"].item() == 0.707
    assert set(ref["table"]) == {"baseline", "main", "learning_rate", "beta", "batch_size", "rollout_length"}


@pytest.mark.slow  # executes the analysis notebook over three synthetic sweeps
def test_analysis_notebook_renders_every_section(tmp_path):
    make_outputs(tmp_path, "seeds", [{"lmbda": lm, "seed": sd} for lm in (0, 1) for sd in (1, 2)])
    make_outputs(tmp_path, "lr", [{"lmbda": lm, "learning_rate": lr, "max_steps": st} for lm in (0, 1)
                                  for lr in (1e-5, 1e-4) for st in (10, 20)], seed=1)
    make_outputs(tmp_path, "ladder", [{"quant_type": q, "lmbda": lm, "seed": sd} for q in ("int4", "int2")
                                      for lm in (0, 1) for sd in (1, 2)], seed=2)
    arms = ((0, 10), (1, 10), (0, 16))  # step-matched λ=0 and λ=1, and a FLOP-matched λ=0
    make_outputs(tmp_path, "arms", [{"lmbda": lm, "max_steps": st, "seed": sd} for lm, st in arms for sd in (1, 2)],
                 seed=3)
    out = tmp_path / "analysis.ipynb"
    pm.execute_notebook(str(ROOT / "notebooks" / "analysis.ipynb"), str(out), cwd=str(ROOT), progress_bar=False,
                        parameters={"outputs": [str(tmp_path)], "figures_dir": str(tmp_path / "fig"),
                                    "n_boot": 500})
    text = out.read_text()
    assert "differences resolved" in text and "varies: lmbda, learning_rate, max_steps" in text
    # Every comparison ends with generated sentences under the rule; nothing says a section does not apply.
    assert "seed-level [" in text and ("resolved, favouring" in text or "not resolved" in text)
    assert "No sweep here" not in text and "No ladder sweep" not in text and "no seed replication" not in text
    assert "λ=1, 10 steps − λ=0, 16 steps" in text  # a FLOP-matched arm is compared with the λ=1 arm
    for name in ("main_comparison", "lr_learning_rate", "lr_extended_training", "compute_cost", "seeds_comparisons",
                 "arms_comparisons", "heldout_curves", "distribution_mismatch", "gap_to_teacher_vs_original",
                 "ladder_ladder"):
        for ext in ("png", "svg"):
            assert (tmp_path / "fig" / f"{name}.{ext}").stat().st_size > 0, name


def _reference_hierarchical(pe, a_runs, b_runs, n_boot, seed):
    """The same resampling written as explicit loops: per replicate, draw runs of each condition, then
    documents per task, and average the per-document differences (rng draws in the same order)."""
    rng = np.random.default_rng(seed)
    tasks = [t for t in TASKS if t in set(pe["task"])]
    table = pe.pivot_table(index=["task", "doc_id"], columns="run", values="acc")
    w_a = rng.multinomial(len(a_runs), np.full(len(a_runs), 1 / len(a_runs)), size=n_boot)
    w_b = rng.multinomial(len(b_runs), np.full(len(b_runs), 1 / len(b_runs)), size=n_boot)
    out = np.zeros(n_boot)
    for task in tasks:
        docs = table.xs(task, level=0)
        counts = rng.multinomial(len(docs), np.full(len(docs), 1 / len(docs)), size=n_boot)
        for r in range(n_boot):
            total = 0.0
            for d in range(len(docs)):
                for _ in range(counts[r, d]):
                    mean_b = sum(w_b[r, i] * docs.iloc[d][run] for i, run in enumerate(b_runs)) / len(b_runs)
                    mean_a = sum(w_a[r, i] * docs.iloc[d][run] for i, run in enumerate(a_runs)) / len(a_runs)
                    total += mean_b - mean_a
            out[r] += total / len(docs) / len(tasks)
    return out


def test_hierarchical_bootstrap_equals_the_direct_computation():
    rng = np.random.default_rng(1)
    rows = []
    runs = {0: ["a1", "a2", "a3"], 1: ["b1", "b2"]}
    for lmbda, names in runs.items():
        for k, run in enumerate(names):
            for task, n in (("hellaswag", 7), ("mmlu", 5)):
                for doc in range(n):
                    rows.append({"run": run, "role": "student", "lmbda": lmbda, "task": task, "subject": None,
                                 "doc_id": doc, "acc": float(rng.random() < 0.4 + 0.1 * lmbda + 0.05 * k)})
    pe = pd.DataFrame(rows)
    got = analysis.hierarchical_bootstrap(pe, {"lmbda": 0}, {"lmbda": 1}, n_boot=50, seed=3)
    want = _reference_hierarchical(pe, runs[0], runs[1], n_boot=50, seed=3)
    np.testing.assert_allclose(got.samples, want, rtol=1e-12, atol=1e-12)
    assert (got.seeds_a, got.seeds_b, got.documents) == (3, 2, 12)


def test_hierarchical_bootstrap_widens_with_seed_variance():
    # Two seeds per condition that disagree wildly, documents that agree: a document-only bootstrap
    # sees almost no noise, the hierarchical one sees the seeds.
    rows = []
    for lmbda, accs in ((0, (0.2, 0.8)), (1, (0.3, 0.9))):
        for k, p in enumerate(accs):
            for doc in range(200):
                rows.append({"run": f"{lmbda}-{k}", "role": "student", "lmbda": lmbda, "task": "arc_easy",
                             "subject": None, "doc_id": doc, "acc": float(doc < 200 * p)})
    pe = pd.DataFrame(rows)
    docs_only = analysis.hierarchical_bootstrap(pe, {"lmbda": 0}, {"lmbda": 1}, n_boot=2000, resample_seeds=False)
    both = analysis.hierarchical_bootstrap(pe, {"lmbda": 0}, {"lmbda": 1}, n_boot=2000)
    assert both.delta == pytest.approx(docs_only.delta) == pytest.approx(0.1)
    assert (both.ci_high - both.ci_low) > 3 * (docs_only.ci_high - docs_only.ci_low)
    assert not both.resolved and not analysis.excludes_zero(both.ci_low, both.ci_high)


def test_seed_level_interval_equals_scipys_welch_interval():
    from scipy import stats

    a, b = [0.31, 0.35, 0.30, 0.36], [0.40, 0.47, 0.43]
    delta, low, high, df = analysis.seed_level_interval(a, b)
    want = stats.ttest_ind(b, a, equal_var=False).confidence_interval(0.95)
    assert delta == pytest.approx(np.mean(b) - np.mean(a))
    assert (low, high) == (pytest.approx(want.low), pytest.approx(want.high))
    assert df == pytest.approx(stats.ttest_ind(b, a, equal_var=False).df)


def test_the_seed_level_interval_of_a_comparison_is_over_each_seeds_mean():
    from scipy import stats

    rng = np.random.default_rng(4)
    rows = [{"run": f"{lmbda}-{k}", "role": "student", "lmbda": lmbda, "task": task, "subject": None, "doc_id": doc,
             "acc": float(rng.random() < 0.4 + 0.2 * lmbda)}
            for lmbda in (0, 1) for k in range(3) for task in ("arc_easy", "mmlu") for doc in range(30)]
    pe = pd.DataFrame(rows)
    got = analysis.hierarchical_bootstrap(pe, {"lmbda": 0}, {"lmbda": 1}, n_boot=200)
    seed_means = pe.groupby(["lmbda", "run", "task"])["acc"].mean().groupby(["lmbda", "run"]).mean()
    want = stats.ttest_ind(seed_means[1], seed_means[0], equal_var=False).confidence_interval(0.95)
    assert (got.seed_low, got.seed_high) == (pytest.approx(want.low), pytest.approx(want.high))
    assert got.resolved == (analysis.excludes_zero(got.ci_low, got.ci_high) and want.low > 0)


def test_no_interval_without_seed_replication(tmp_path):
    assert np.isnan(analysis.seed_level_interval([0.3], [0.4, 0.5])[1])
    make_outputs(tmp_path, "one", [{"lmbda": lm, "seed": 1} for lm in (0, 1)])
    w = results.wide(results.collect(tmp_path))
    table = analysis.compare_conditions(results.per_example(tmp_path), results.per_example_fidelity(tmp_path),
                                        w[w["role"] == "student"], n_boot=100)
    assert len(table) > 3 and set(table["seeds"]) == {"1 vs 1"}
    assert table[["ci_low", "ci_high", "seed_low", "seed_high"]].isna().all().all()
    assert not table["resolved"].any() and set(table["favours"]) == {"neither (unresolved)"}
    text = analysis.summarize_comparisons(table, {})
    assert "no seed replication, so no interval; not resolved" in text and "[" not in text


def test_every_comparison_states_its_weighting(tmp_path):
    make_outputs(tmp_path, "s", [{"lmbda": lm, "seed": sd} for lm in (0, 1) for sd in (1, 2)])
    w = results.wide(results.collect(tmp_path))
    table = analysis.compare_conditions(results.per_example(tmp_path), results.per_example_fidelity(tmp_path),
                                        w[w["role"] == "student"], n_boot=100)
    assert table["weighting"].notna().all()
    assert table.set_index("metric").loc["forward_kl", "weighting"] == analysis.FIDELITY_WEIGHTING
    # The tables average fidelity the same way: per chat, not the record's token-weighted aggregate.
    pef = results.per_example_fidelity(tmp_path)
    one = pef[(pef["run"] == "lmbda-0_seed-1") & (pef["role"] == "student") & (pef["metric"] == "forward_kl")]
    row = w[(w["run"] == "lmbda-0_seed-1") & (w["role"] == "student")].iloc[0]
    assert row["forward_kl"] == pytest.approx(one["value"].mean())


def test_a_baseline_evaluated_twice_with_different_results_is_kept(tmp_path):
    make_outputs(tmp_path, "s", [{"lmbda": lm, "seed": sd} for lm in (0, 1) for sd in (1, 2)], calibrated=True)
    record = tmp_path / "s" / "lmbda-1_seed-2" / "eval.json"
    evaluation = json.loads(record.read_text())
    evaluation["baselines"]["gptq"]["perplexity"]["perplexity"] += 1.0  # a second calibration, same key
    record.write_text(json.dumps(evaluation))
    w = results.wide(results.collect(tmp_path))
    gptq = w[w["role"] == "gptq"]
    assert len(gptq) == 2 and {analysis.condition_label(r, []) for _, r in gptq.iterrows()} == {"GPTQ int4 g64"}
    table = analysis.condition_table(w, ["lmbda"], ["perplexity"])
    assert table.loc["GPTQ int4 g64", ("perplexity", "n")] == 2


def test_a_parameter_added_after_a_run_reads_as_its_default(tmp_path):
    make_outputs(tmp_path, "s", [{"lmbda": lm, "seed": sd} for lm in (0, 1) for sd in (1, 2)])
    older = tmp_path / "s" / "lmbda-0_seed-1" / "config.json"
    record = json.loads(older.read_text())
    del record["train"]["max_length"]  # written before the parameter existed
    older.write_text(json.dumps(record))
    w = results.wide(results.collect(tmp_path))
    assert analysis.varying(w) == ["lmbda"]
    assert set(w.loc[w["role"] == "student", "max_length"]) == {TrainConfig().max_length}


def test_rollout_forms_that_only_round_differently_are_one_condition():
    """An `auto` rollout that chose compiled decoding beside an explicit exact form is the same condition;
    bf16 rollouts sample another policy and are not."""
    students = pd.DataFrame({"role": "student", "lmbda": [0, 0, 1, 1], "learning_rate": [1e-4, 3e-5, 1e-4, 3e-5],
                             "rollout_dtype": ["float32", "auto", "float32", "auto"],
                             "rollout_matmul": ["linear", "auto", "linear", "auto"],
                             "rollout_compile": [False, "auto", False, "auto"]})
    assert analysis.varying(students) == ["lmbda", "learning_rate"]
    students.loc[3, "rollout_dtype"] = "bfloat16"
    assert analysis.varying(students) == ["lmbda", "rollout_dtype", "learning_rate"]
