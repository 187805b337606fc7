"""Generation results as tidy frames: per example, per mode, baselines labelled by their run."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from onpolicy_lib.results import per_example_generation


def _generation(values: dict[str, list[float]]) -> dict:
    """A generation record: per prompt (id -> rouge_l of each output), greedy = the first output."""
    def records(take):
        return [{"task": "gsm8k", "id": i, **({"sample": k} if take is None else {}), "rouge_l": v,
                 "teacher_nll": 1.0, "correct": k == 0, "tokens": 3, "hit_cap": False}
                for i, vs in values.items() for k, v in enumerate(vs) if take is None or k == take]
    return {"greedy": {"per_example": records(0)}, "sampled": {"per_example": records(None)}}


def test_per_example_generation(tmp_path):
    run = tmp_path / "study" / "lmbda-1"
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"train": {"lmbda": 1, "seed": 3}}))
    (run / "eval.json").write_text(json.dumps({
        "student": {"generation": _generation({"a": [0.5, 0.7], "b": [0.1, 0.3]})},
        "baselines": {"teacher": {"generation": _generation({"a": [0.9, 0.9], "b": [0.8, 0.8]})},
                      "ptq": {"generation": _generation({"a": [0.2, 0.4], "b": [0.0, 0.0]})}}}))
    greedy = per_example_generation(tmp_path)
    rouge = greedy[greedy["metric"] == "rouge_l"].set_index(["role", "id"])["value"]
    assert rouge.to_dict() == {("student", "a"): 0.5, ("student", "b"): 0.1, ("teacher", "a"): 0.9,
                               ("teacher", "b"): 0.8, ("ptq", "a"): 0.2, ("ptq", "b"): 0.0}
    assert set(greedy["run"]) == {"lmbda-1"} and set(greedy["lmbda"]) == {1} and set(greedy["source"]) == {"gsm8k"}
    sampled = per_example_generation(tmp_path, mode="sampled")
    rouge = sampled[sampled["metric"] == "rouge_l"].set_index(["role", "id"])["value"]
    assert rouge[("student", "a")] == pytest.approx(0.6)  # an example's mean over its outputs
    correct = sampled[sampled["metric"] == "correct"].set_index(["role", "id"])["value"]
    assert correct[("student", "b")] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="mode must be one of greedy, sampled"):
        per_example_generation(tmp_path, mode="beam")


def _study(tmp_path, student_rouge: dict[tuple, float]) -> None:
    """Runs (λ, seed[, max_steps]) whose students score ``student_rouge`` ROUGE-L on every prompt; teacher 0.8,
    PTQ 0.2."""
    for key, rouge in student_rouge.items():
        lmbda, seed, *steps = key
        run = tmp_path / "study" / "_".join([f"lmbda-{lmbda}", f"seed-{seed}", *(f"steps-{s}" for s in steps)])
        run.mkdir(parents=True)
        train = {"lmbda": lmbda, "seed": seed, **({"max_steps": steps[0]} if steps else {})}
        (run / "config.json").write_text(json.dumps({"train": train}))
        offsets = {"a": 0.0, "b": 0.02, "c": -0.02}
        (run / "eval.json").write_text(json.dumps({
            "student": {"generation": _generation({i: [rouge + o] for i, o in offsets.items()})},
            "baselines": {"teacher": {"generation": _generation({i: [0.8] for i in offsets})},
                          "ptq": {"generation": _generation({i: [0.2] for i in offsets})}}}))


def test_generation_in_the_lambda_comparisons_and_the_gap_recovered(tmp_path):
    from onpolicy_lib import analysis

    _study(tmp_path, {(0, 1): 0.40, (0, 2): 0.44, (1, 1): 0.50, (1, 2): 0.56})
    peg = analysis.generation_frame(tmp_path)
    assert {"gen_greedy/rouge_l", "gen_sampled/rouge_l", "gen_greedy/correct"} <= set(peg["metric"])
    students = peg[peg["role"] == "student"].drop_duplicates("run")[["run", "role", "lmbda", "seed"]]
    table = analysis.compare_conditions(pd.DataFrame(), peg, students, "lmbda", n_boot=200, run_metrics=())
    row = table.set_index("metric").loc["gen_greedy/rouge_l"]
    assert row["delta"] == pytest.approx(0.53 - 0.42)
    assert row["weighting"] == analysis.GENERATION_WEIGHTING
    assert row["seed_low"] < row["delta"] < row["seed_high"]
    gaps = analysis.generation_gap_recovered(peg).set_index(["lmbda", "metric"])
    assert gaps.loc[(1, "gen_greedy/rouge_l"), "mean"] == pytest.approx((0.53 - 0.2) / 0.6)
    assert gaps.loc[(0, "gen_greedy/rouge_l"), "seeds"] == 2


def test_step_and_flop_matched_arms_are_compared_under_the_rule(tmp_path):
    """A study with λ=0 and λ=1 at 100 steps and λ=0 at 159: the pairs that differ in λ are the step-matched
    and the FLOP-matched one, each b − a with both intervals; λ=0 at two step counts is not a λ comparison."""
    from onpolicy_lib import analysis

    _study(tmp_path, {(0, 1, 100): 0.40, (0, 2, 100): 0.44, (1, 1, 100): 0.50, (1, 2, 100): 0.56,
                      (0, 1, 159): 0.46, (0, 2, 159): 0.48})
    peg = analysis.generation_frame(tmp_path)
    students = peg[peg["role"] == "student"].drop_duplicates("run")[["run", "role", "lmbda", "seed", "max_steps"]]
    pairs = analysis.arm_pairs(students, ["lmbda", "max_steps"])
    assert pairs == [({"lmbda": 0, "max_steps": 100}, {"lmbda": 1, "max_steps": 100}),
                     ({"lmbda": 0, "max_steps": 159}, {"lmbda": 1, "max_steps": 100})]
    table = analysis.compare_pairs(pd.DataFrame(), peg, students, pairs, n_boot=200, run_metrics=())
    rouge = table[table["metric"] == "gen_greedy/rouge_l"].set_index("comparison")
    assert list(rouge.index) == ["λ=1, 100 steps − λ=0, 100 steps", "λ=1, 100 steps − λ=0, 159 steps"]
    assert rouge["delta"].tolist() == pytest.approx([0.53 - 0.42, 0.53 - 0.47])
    assert (rouge["seeds"] == "2 vs 2").all() and rouge["seed_low"].notna().all()
    runs = analysis.generation_runs(peg, ["lmbda", "max_steps"])
    assert runs["arm"].tolist() == ["λ=0, 100 steps"] * 2 + ["λ=0, 159 steps"] * 2 + ["λ=1, 100 steps"] * 2
    assert runs["gen_greedy/rouge_l"].tolist() == pytest.approx([0.40, 0.44, 0.46, 0.48, 0.50, 0.56])
    assert analysis.generation_references(peg, ["gen_greedy/rouge_l"]) == {
        "teacher": {"gen_greedy/rouge_l": pytest.approx(0.8)}, "RTN PTQ": {"gen_greedy/rouge_l": pytest.approx(0.2)}}
    plain = analysis.compare_conditions(pd.DataFrame(), peg, students[students["max_steps"] == 100], n_boot=200,
                                        run_metrics=())
    assert plain.set_index("metric").loc["gen_greedy/rouge_l", "comparison"] == "λ=1 − λ=0"


def test_generation_power_against_a_direct_computation():
    """The teacher-to-PTQ gap with its paired t interval, and the paired MDE from two students' differences."""
    import numpy as np
    from scipy import stats

    from onpolicy_lib import analysis

    rng = np.random.default_rng(0)
    ids = [f"p{i}" for i in range(30)]
    teacher, ptq = rng.normal(0.5, 0.2, 30), rng.normal(0.3, 0.2, 30)
    s0, s1 = ptq + rng.normal(0.05, 0.1, 30), ptq + rng.normal(0.1, 0.1, 30)
    rows = [{"run": run, "role": role, "metric": "gen_greedy/rouge_l", "id": i, "value": float(v)}
            for run, student in (("lmbda-0", s0), ("lmbda-1", s1))
            for role, values in (("teacher", teacher), ("ptq", ptq), ("student", student))
            for i, v in zip(ids, values, strict=True)]
    table = analysis.generation_power(pd.DataFrame(rows), planned_prompts=120).set_index("metric")
    row = table.loc["gen_greedy/rouge_l"]
    diff = teacher - ptq
    half = stats.t.ppf(0.975, 29) * diff.std(ddof=1) / np.sqrt(30)
    assert row["prompts"] == 30 and row["gap"] == pytest.approx(diff.mean())
    assert (row["gap_low"], row["gap_high"]) == pytest.approx((diff.mean() - half, diff.mean() + half))
    sd = (s0 - s1).std(ddof=1)
    assert row["sd_from"] == "student pairs" and row["pair_sd"] == pytest.approx(sd)
    mde = (stats.t.ppf(0.975, 119) + stats.norm.ppf(0.8)) * sd / np.sqrt(120)
    assert row["mde"] == pytest.approx(mde) and row["mde_over_gap"] == pytest.approx(mde / diff.mean())


def test_rate_choice_by_greedy_quality():
    """Per λ, the rate with the best ROUGE-L is chosen; the teacher NLL (lower is better) may disagree."""
    from onpolicy_lib import analysis

    students = pd.DataFrame({
        "lmbda": [0, 0, 0, 1, 1, 1, 1], "learning_rate": [1e-4, 3e-5, 3e-4, 1e-4, 3e-5, 3e-4, 3e-4],
        "gen_greedy/rouge_l": [0.30, 0.25, 0.20, 0.20, 0.22, 0.30, 0.32],
        "gen_greedy/teacher_nll": [1.0, 1.1, 1.2, 0.8, 0.7, 0.9, 0.9]})
    table = analysis.rate_choice(students).set_index(["lmbda", "learning_rate"])
    assert table[table["chosen"]].index.tolist() == [(0, 1e-4), (1, 3e-4)]
    assert table.loc[(1, 3e-4), "gen_greedy/rouge_l"] == pytest.approx(0.31) and table.loc[(1, 3e-4), "seeds"] == 2
    assert table.loc[(0, 1e-4), "agrees"] and not table.loc[(1, 3e-4), "agrees"]
    assert analysis.rate_choice(students.drop(columns=list(analysis.RATE_CRITERIA))).empty


def test_rate_choice_breaks_near_ties_by_the_second_criterion():
    """Rates within the tolerance of the best on ROUGE-L are tied, and the teacher NLL chooses among them; a
    rate outside it never wins, however good its NLL; without a tolerance the first criterion alone decides."""
    from onpolicy_lib import analysis

    students = pd.DataFrame({
        "lmbda": [0, 0, 0, 1, 1, 1], "learning_rate": [1e-4, 3e-5, 3e-4, 1e-4, 3e-5, 3e-4],
        "gen_greedy/rouge_l": [0.190, 0.185, 0.140, 0.25, 0.20, 0.19],
        "gen_greedy/teacher_nll": [0.45, 0.42, 0.40, 0.9, 0.5, 0.5]})
    tolerance = {"gen_greedy/rouge_l": 0.02, "gen_greedy/teacher_nll": 0.05}
    table = analysis.rate_choice(students, tolerance=tolerance).set_index(["lmbda", "learning_rate"])
    assert table[table["chosen"]].index.tolist() == [(0, 3e-5), (1, 1e-4)]
    assert table["tied"].tolist() == [True, True, False, False, False, False]
    plain = analysis.rate_choice(students).set_index(["lmbda", "learning_rate"])
    assert plain[plain["chosen"]].index.tolist() == [(0, 1e-4), (1, 1e-4)] and not plain["tied"].any()


def test_rate_tolerance_is_the_pilots_mde():
    """The tolerance of each criterion is generation_power's paired MDE at the pilot's prompts."""
    from onpolicy_lib import analysis

    rng = np.random.default_rng(0)
    rows = []
    for role, run, shift in (("teacher", "t", 0.0), ("ptq", "p", 0.2), ("student", "a", 0.1), ("student", "b", 0.12)):
        for i in range(30):
            for metric in analysis.RATE_CRITERIA:
                rows.append({"role": role, "run": run, "id": f"x:{i}", "metric": metric,
                             "value": shift + rng.normal(0, 0.1)})
    frame = pd.DataFrame(rows)
    power = analysis.generation_power(frame).set_index("metric")
    tolerance = analysis.rate_tolerance(frame)
    assert set(tolerance) == set(analysis.RATE_CRITERIA)
    assert tolerance["gen_greedy/rouge_l"] == pytest.approx(power.loc["gen_greedy/rouge_l", "mde"])


def test_the_reports_generation_section_reads_a_pilot(tmp_path, monkeypatch):
    """An evaluated pilot run appears in the report with the teacher and PTQ, the rate chosen per λ and the
    power table; the section says the pilot is in progress until every λ has its three rates."""
    from onpolicy_lib import report

    def generation(values: dict[str, float]) -> dict:
        per_example = [{"task": "gsm8k", "id": i, "rouge_l": v, "teacher_nll": 2 - v, "correct": v > 0.5,
                        "tokens": 10, "hit_cap": False} for i, v in values.items()]
        summary = {"rouge_l": {"mean": sum(values.values()) / len(values)},
                   "teacher_nll": {"mean": 2 - sum(values.values()) / len(values)}}
        return {"greedy": {"per_example": per_example, "summary": {"all": summary}}}

    teacher = generation({"a": 0.9, "b": 0.7, "c": 0.8})
    ptq = generation({"a": 0.2, "b": 0.4, "c": 0.1})
    for lmbda, student in ((0, {"a": 0.5, "b": 0.5, "c": 0.3}), (1, {"a": 0.6, "b": 0.4, "c": 0.5})):
        run = tmp_path / report.GEN_PILOT / f"lr-0.0001_lmbda-{lmbda}"
        run.mkdir(parents=True)
        (run / "config.json").write_text(json.dumps({"train": {"lmbda": lmbda, "learning_rate": 1e-4, "seed": 1}}))
        (run / "eval.json").write_text(json.dumps({"student": {"generation": generation(student)},
                                                   "baselines": {"teacher": {"generation": teacher},
                                                                 "ptq": {"generation": ptq}}}))
    monkeypatch.setattr(report, "OUTPUTS", tmp_path)
    text = report.section_generation()
    assert "(`outputs/cpu_gen_lr/`, in progress)" in text and "Evaluated runs: 2 of the pilot's six" in text
    assert "λ=0: 0.0001; λ=1: 0.0001" in text
    lines = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ")}
    assert "0.800" in lines["teacher"] and "0.233" in lines["RTN PTQ"] and "0.500" in lines["student λ=1, lr 0.0001"]
    assert "0.567 [" in lines["ROUGE-L, greedy outputs"]  # the teacher-to-PTQ gap over the three prompts


def test_quality_metric_falls_back_to_what_a_sweep_evaluated():
    """A generation-only sweep (no benchmarks, no fidelity) plots its cost against the teacher NLL."""
    from onpolicy_lib import analysis

    assert analysis.quality_metric(pd.DataFrame({"average": [0.4], "forward_kl": [0.1]})) == "average"
    assert analysis.quality_metric(pd.DataFrame({"average": [np.nan], "forward_kl": [0.1]})) == "forward_kl"
    assert analysis.quality_metric(pd.DataFrame({"gen_greedy/teacher_nll": [0.4],
                                                 "heldout_loss_after": [0.1]})) == "gen_greedy/teacher_nll"
    with pytest.raises(ValueError, match="quality metrics"):
        analysis.quality_metric(pd.DataFrame({"x": [1]}))


def test_the_reports_generation_section_reads_the_study(tmp_path, monkeypatch):
    """The study's runs appear per arm (mean ± sd over seeds) beside the teacher and PTQ, with the gap each arm
    recovers, the step- and FLOP-matched comparisons under the rule, the cost per arm, and its state."""
    from onpolicy_lib import report

    def generation(values: list[float]) -> dict:
        per_example = [{"task": "gsm8k", "id": f"p{i}", "rouge_l": v, "teacher_nll": 2 - v, "correct": v > 0.5,
                        "tokens": 10, "hit_cap": False} for i, v in enumerate(values)]
        mean = sum(values) / len(values)
        summary = {"rouge_l": {"mean": mean}, "teacher_nll": {"mean": 2 - mean}}
        return {"greedy": {"per_example": per_example, "summary": {"all": summary}}}

    prompts = [float(x) for x in np.linspace(-0.05, 0.05, 12)]
    arms = {(0, 100): 0.40, (1, 100): 0.50, (0, 159): 0.45}
    manifest = {"name": report.GEN_STUDY, "runs": {}}
    for (lmbda, steps), level in arms.items():
        for seed in (1, 2, 3):
            name = f"seed-{seed}_lmbda-{lmbda}_steps-{steps}"
            run = tmp_path / report.GEN_STUDY / name
            run.mkdir(parents=True)
            train = {"model_name": "tiny", "quant_type": "int4", "lmbda": lmbda, "max_steps": steps, "seed": seed,
                     "learning_rate": 3e-5, "max_new_tokens": 256, "max_length": 768, "temperature": 0.9}
            (run / "config.json").write_text(json.dumps({"train": train, "resolved": {"group_size": 64},
                                                         "machine": "Intel Xeon (family 6, model 1), 2 cores"}))
            (run / "metrics.json").write_text(json.dumps({"steps": [{"step": 1, "loss": 0.1}], "flops": 1e12 * (
                1.6 if lmbda else steps / 100), "tokens_trained": 100, "wall_time_s": 10.0}))
            student = generation([level + 0.01 * seed + p for p in prompts])
            (run / "eval.json").write_text(json.dumps({
                "student": {"generation": student},
                "baselines": {"teacher": {"generation": generation([0.8 + p for p in prompts])},
                              "ptq": {"generation": generation([0.2 + p for p in prompts])}}}))
            manifest["runs"][name] = {"params": train}
    manifest["runs"]["seed-4_lmbda-0_steps-100"] = {"params": {}}  # planned, not yet run
    (tmp_path / report.GEN_STUDY / "sweep.json").write_text(json.dumps(manifest))
    monkeypatch.setattr(report, "OUTPUTS", tmp_path)
    text = report.section_generation()
    assert "(`outputs/cpu_gen/`, in progress: 9 of its 10 runs evaluated)" in text
    assert "12 *test* prompts" in text and "`tiny` at INT4 g64" in text and "Xeon 6/1" in text
    lines = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ")}
    assert "0.420 ± 0.01" in lines["student λ=0, 100 steps"] and "| 3 |" in lines["student λ=0, 100 steps"]
    assert "0.800" in lines["teacher"] and "0.200" in lines["RTN PTQ"]
    assert "| λ=1, 100 steps | 0.53 ± 0.02 | 0.53 ± 0.02 |" in text  # (0.52 - 0.2) / 0.6: the gap recovered
    header = next(line for line in text.splitlines() if "λ=1, 100 steps − λ=0, 100 steps" in line)
    assert "λ=1, 100 steps − λ=0, 159 steps" in header
    assert "**+0.100**" in lines["ROUGE-L, greedy outputs"]  # resolved: every seed's arm differs by 0.1
    assert "| λ=1, 100 steps | 1.60 × 10^12 |" in text and "| λ=0, 159 steps | 1.59 × 10^12 |" in text
    # No median step recorded: FLOPs only, no training-time ratio.
    assert "λ=1, 100 steps spent 1.60× the FLOPs of λ=0, 100 steps. " in text
    assert "λ=1, 100 steps spent 1.01× the FLOPs of λ=0, 159 steps.\n" in text
    with_figure = report.section_generation(tmp_path / "figures")
    assert "![generation arms](figures/generation_arms.png)" in with_figure
    assert (tmp_path / "figures" / "generation_arms.png").stat().st_size > 0


def test_the_reports_bf16_training_twin_against_its_study_run(tmp_path, monkeypatch):
    """The bf16 twin is set beside the study run of the same seed, λ and steps, prompt by prompt, with the
    float32 arm's seed sd as the scale; and paired_run_difference against a direct computation."""
    from onpolicy_lib import report

    def write(sweep: str, name: str, seed: int, values: list[float], dtype: str, heldout: float) -> None:
        run = tmp_path / sweep / name
        run.mkdir(parents=True)
        train = {"model_name": "tiny", "quant_type": "int4", "lmbda": 0, "max_steps": 100, "seed": seed,
                 "learning_rate": 3e-5, "max_new_tokens": 256, "max_length": 768, "temperature": 0.9, "dtype": dtype}
        (run / "config.json").write_text(json.dumps({"train": train, "machine": "Intel Xeon (family 6, model 1)"}))
        (run / "metrics.json").write_text(json.dumps({"heldout_loss_after": heldout, "wall_time_s": 10.0,
                                                      "median_step_s": 2.0 if dtype == "bfloat16" else 3.0}))
        per_example = [{"task": "gsm8k", "id": f"p{i}", "rouge_l": v, "teacher_nll": 2 - v}
                       for i, v in enumerate(values)]
        (run / "eval.json").write_text(json.dumps({"student": {"generation": {"greedy": {
            "per_example": per_example}}}}))

    prompts = [0.1, 0.2, 0.3, 0.4]
    for seed in (1, 2, 3):
        write(report.GEN_STUDY, f"seed-{seed}_lmbda-0_steps-100", seed, [p + 0.01 * seed for p in prompts],
              "auto", 0.04 + 0.001 * seed)
    # The twin of seed 2 (not seed 1, so matching by seed is tested).
    write(report.BF16_TWIN, "run", 2, [p + 0.02 + 0.005 for p in prompts], "bfloat16", 0.043)
    monkeypatch.setattr(report, "OUTPUTS", tmp_path)
    from onpolicy_lib import analysis

    frame = analysis.generation_frame([tmp_path / report.GEN_STUDY, tmp_path / report.BF16_TWIN])
    paired = analysis.paired_run_difference(frame, "seed-2_lmbda-0_steps-100", "run", ["gen_greedy/rouge_l"])
    assert paired.iloc[0]["difference"] == pytest.approx(0.005) and paired.iloc[0]["prompts"] == 4
    assert paired.iloc[0]["a"] == pytest.approx(0.27)
    text = report._bf16_training()
    assert "seed-2 λ=0, 100 steps run" in text and "4 test prompts" in text
    lines = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ")}
    # seed means 0.26, 0.27, 0.28: sd 0.01; the difference half of it
    assert "| 0.270 | 0.275 | +0.0050 | 0.010 | 0.50 |" in lines["ROUGE-L, greedy outputs"]
    assert "+0.001" in lines["held-out divergence after training (per token)"]
    assert "| 3.00 | 2.00 | -1.0 | – | – |" in lines["median step (s)"]
    assert "difference in seed sds" in text
    assert "### bf16 autocast training" in report.section_generation()


def test_the_reports_cross_cpu_twin_against_its_study_run(tmp_path, monkeypatch):
    """The same configuration on a second CPU type is set beside the study's run of that seed, CPU types named."""
    from onpolicy_lib import report

    def write(sweep: str, name: str, seed: int, values: list[float], machine: str, step: float) -> None:
        run = tmp_path / sweep / name
        run.mkdir(parents=True)
        train = {"model_name": "tiny", "quant_type": "int4", "lmbda": 0, "max_steps": 100, "seed": seed,
                 "learning_rate": 3e-5, "max_new_tokens": 256, "max_length": 768, "temperature": 0.9}
        (run / "config.json").write_text(json.dumps({"train": train, "machine": machine}))
        (run / "metrics.json").write_text(json.dumps({"heldout_loss_after": 0.04, "median_step_s": step}))
        per_example = [{"task": "gsm8k", "id": f"p{i}", "rouge_l": v, "teacher_nll": 2 - v}
                       for i, v in enumerate(values)]
        (run / "eval.json").write_text(json.dumps({"student": {"generation": {"greedy": {
            "per_example": per_example}}}}))

    zen5, xeon = "AMD EPYC (family 26, model 2), avx2", "Intel(R) Xeon(R) Processor (family 6, model 167), avx2"
    prompts = [0.1, 0.2, 0.3, 0.4]
    monkeypatch.setattr(report, "OUTPUTS", tmp_path)
    assert report._cross_cpu() == ""
    for seed in (1, 2, 3):
        write(report.GEN_STUDY, f"seed-{seed}_lmbda-0_steps-100", seed, [p + 0.01 * seed for p in prompts],
              zen5, 6.0)
    write(report.CROSS_CPU_TWIN, "run", 2, [p + 0.02 - 0.002 for p in prompts], xeon, 4.0)
    text = report._cross_cpu()
    assert "seed-2 λ=0, 100 steps run (EPYC 26/2)" in text and "trained and evaluated on Xeon 6/167" in text
    lines = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ")}
    assert "| the study's run | on Xeon 6/167 | difference |" in text
    assert "| 0.270 | 0.268 | -0.0020 | 0.010 | 0.20 |" in lines["ROUGE-L, greedy outputs"]
    assert "| 6.00 | 4.00 | -2.0 | – | – |" in lines["median step (s)"]
    section = report.section_generation()
    assert "### The same run on another CPU type" in section
    assert "Other generation studies" not in section  # read here, not left to its own directory


def test_repetition_is_the_share_of_repeated_word_ngrams():
    from onpolicy_lib.generation_eval import repetition

    assert repetition("one two three four five six") == 0.0
    assert repetition("a b c d a b c d") == pytest.approx(1 - 4 / 5)  # abcd bcda cdab dabc abcd
    assert repetition("x y z w " * 50) > 0.95  # a loop
    assert repetition("too short") is None and repetition("a b c d") is None


def test_repetition_is_read_from_each_outputs_text(tmp_path):
    """Evaluations record their outputs' text; the repetition of each is computed when results are read,
    per example as every generation metric (a sampled example's mean over its samples)."""
    run = tmp_path / "study" / "lmbda-0"
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"train": {"lmbda": 0, "seed": 1}}))
    record = {"task": "gsm8k", "id": "a", "rouge_l": 0.5, "teacher_nll": 1.0, "correct": False, "tokens": 8,
              "hit_cap": False}
    generation = {"greedy": {"per_example": [{**record, "completion": "a b c d a b c d"}]},
                  "sampled": {"per_example": [{**record, "sample": 0, "completion": "a b c d a b c d"},
                                              {**record, "sample": 1, "completion": "one two three four five"}]}}
    (run / "eval.json").write_text(json.dumps({"student": {"generation": generation}}))
    greedy = per_example_generation(tmp_path).set_index("metric")["value"]
    assert greedy["repetition"] == pytest.approx(0.2)
    sampled = per_example_generation(tmp_path, mode="sampled").set_index("metric")["value"]
    assert sampled["repetition"] == pytest.approx(0.1)


def test_an_unresolved_teacher_nll_difference_is_bounded_by_both_intervals():
    from onpolicy_lib import report

    compared = pd.DataFrame([
        {"metric": "gen_greedy/teacher_nll", "comparison": "λ=1 − λ=0", "resolved": False,
         "ci_low": -0.02, "ci_high": 0.06, "seed_low": -0.03, "seed_high": 0.05},
        {"metric": "gen_greedy/rouge_l", "comparison": "λ=1 − λ=0", "resolved": False,  # not the NLL: not bounded
         "ci_low": -0.02, "ci_high": 0.06, "seed_low": -0.03, "seed_high": 0.05},
        {"metric": "gen_sampled/teacher_nll", "comparison": "λ=1 − λ=0", "resolved": True,  # resolved: its own row
         "ci_low": 0.01, "ci_high": 0.06, "seed_low": 0.02, "seed_high": 0.05}])
    references = {"teacher": {"gen_greedy/teacher_nll": 0.3}, "RTN PTQ": {"gen_greedy/teacher_nll": 0.5}}
    text = report._unresolved_bounds(compared, references, {"gen_greedy/teacher_nll": "NLL greedy"})
    assert "NLL greedy, λ=1 − λ=0: within [-0.030, +0.060] (-15% to +30% of the teacher-to-PTQ gap)." in text
    assert text.count("within") == 1
    assert report._unresolved_bounds(compared.iloc[1:], references, {}) == ""
