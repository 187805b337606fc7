"""The study's tables and statistics, from the DataFrames of :mod:`onpolicy_lib.results`.

Every table here is computed from collected runs (nothing typed in), grouped by the values a
sweep varies and averaged over seeds. The paired bootstrap compares two conditions on the same
benchmark documents, which removes the between-document variance that dominates unpaired
comparisons at these sample sizes.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from onpolicy_lib import fidelity, results
from onpolicy_lib.config import BENCHMARKS, CALIBRATED_METHODS, TrainConfig, format_value

FIDELITY_NAMES = {**fidelity.METRICS, "perplexity": "perplexity"}
FIDELITY_COLUMNS = list(FIDELITY_NAMES)
REFERENCE_CSV = Path(__file__).parent / "reference" / "original_study.csv"
# Parameters that describe a condition: what defines a run, but the seed (conditions are averaged over seeds).
# The rollout matmul and compile options sample the same policy within float rounding, so runs that differ
# only in them (an `auto` that chose compiled rollouts beside an explicit exact form) are one condition.
ROUNDING_ONLY = ("rollout_matmul", "rollout_compile")
CONDITION_FIELDS = [f for f in TrainConfig.identity_fields() if f != "seed" and f not in ROUNDING_ONLY]


def _condition_value(field: str, value: Any) -> str:
    if field == "rollout_dtype" and value == "auto":  # auto samples in float32 (never bf16)
        return "float32"
    return str(value)


def benchmark_columns(w: pd.DataFrame, metric: str = "acc") -> list[str]:
    return [f"{task}/{metric}" for task in BENCHMARKS if f"{task}/{metric}" in w.columns]


def with_average(w: pd.DataFrame, metric: str = "acc") -> pd.DataFrame:
    """Adds ``average``: the unweighted mean over the benchmarks present, as the study's tables read."""
    cols = benchmark_columns(w, metric)
    w = w.copy()
    if cols:
        w["average"] = w[cols].mean(axis=1, skipna=False)
    return w


# Quantized baselines, in table order: round-to-nearest, then the calibrated ones.
BASELINE_ROLES = ("ptq", *CALIBRATED_METHODS)


def varying(w: pd.DataFrame) -> list[str]:
    """Config fields that take more than one value among the students of ``w`` (seed excluded)."""
    students = w[w["role"] == "student"]
    return [f for f in CONDITION_FIELDS
            if f in students and students[f].map(lambda v, f=f: _condition_value(f, v)).nunique(dropna=False) > 1]


REFERENCE_NAMES = {"teacher": "teacher", "ptq": "RTN PTQ", "gptq": "GPTQ", "awq": "AWQ"}


def reference_levels(w: pd.DataFrame, columns: list[str]) -> dict[str, dict[str, float]]:
    """The teacher's and each baseline's mean of ``columns`` in ``w`` ({name: {column: mean}}), for the lines
    a plot of students draws beside them; roles without values are left out."""
    levels = {}
    for role, name in REFERENCE_NAMES.items():
        part = w[w["role"] == role] if "role" in w else w[:0]
        values = {c: float(part[c].mean()) for c in columns if c in part and part[c].notna().any()}
        if values:
            levels[name] = values
    return levels


def condition_label(row: pd.Series, keys: list[str]) -> str:
    if row["role"] == "teacher":
        return results_label(row["run"])  # results.collect names it with its precision: "teacher (Q4_1 GGUF)"
    if row["role"] in BASELINE_ROLES:
        # results.collect names baselines ("PTQ int4 g64", "GPTQ int4 g64"); a second evaluation of the
        # same baseline (another machine, another calibration) is one more replicate of that condition.
        return results_label(row["run"])
    return ", ".join(f"{_symbol(k)}={format_value(row[k])}" for k in keys) or "student"


def results_label(run: str) -> str:
    """A baseline's condition label without the evaluation number results.collect adds to repeats."""
    return re.sub(r" \(evaluation \d+\)$", "", str(run))


def _symbol(key: str) -> str:
    return {"lmbda": "λ", "beta": "β", "learning_rate": "lr", "per_device_train_batch_size": "batch",
            "gradient_accumulation_steps": "grad. accum.", "max_new_tokens": "new tokens",
            "max_steps": "steps"}.get(key, key)


def condition_table(w: pd.DataFrame, keys: list[str] | None = None, columns: list[str] | None = None,
                    baselines: bool = True) -> pd.DataFrame:
    """Mean, standard deviation and number of seeds per condition (baselines first).

    Returns a frame indexed by condition label with a column level ``stat`` in (mean, sd, n).
    """
    w = with_average(w)
    keys = varying(w) if keys is None else keys
    if columns is None:
        columns = [c for c in [*benchmark_columns(w), "average"] if c in w.columns]
    roles = ["teacher", *BASELINE_ROLES, "student"] if baselines else ["student"]
    w = w[w["role"].isin(roles)].copy()
    if w.empty or not columns:
        return pd.DataFrame()
    w["condition"] = w.apply(condition_label, axis=1, keys=keys)
    w["order"] = w["role"].map({role: i for i, role in enumerate(roles)})
    sort = ["order", *keys]
    w = w.sort_values(sort, kind="stable")
    grouped = w.groupby("condition", sort=False)[columns]
    table = pd.concat({"mean": grouped.mean(), "sd": grouped.std(ddof=1), "n": grouped.count()}, axis=1)
    return table.swaplevel(axis=1).sort_index(axis=1, level=0, sort_remaining=False)[columns]


def format_table(table: pd.DataFrame, digits: int = 3) -> pd.DataFrame:
    """``mean ± sd (n)`` strings for display; a single seed shows the value alone."""
    if table.empty:
        return table
    out = {}
    for column in dict.fromkeys(table.columns.get_level_values(0)):
        mean, sd, n = table[(column, "mean")], table[(column, "sd")], table[(column, "n")]
        out[_pretty(column)] = [
            "–" if pd.isna(m) else (f"{m:.{digits}f} ± {s:.{digits}f}" if k > 1 else f"{m:.{digits}f}")
            for m, s, k in zip(mean, sd, n, strict=True)]
    seeds = table[(table.columns.get_level_values(0)[0], "n")]
    frame = pd.DataFrame(out, index=table.index)
    frame["seeds"] = seeds.astype(int).values
    return frame


def _pretty(column: str) -> str:
    task = column.split("/")[0]
    return BENCHMARKS.get(task, FIDELITY_NAMES.get(column, column.replace("_", " ")))


# ---------------------------------------------------------------------------- the statistics rule
# A difference is *resolved* only where two 95% intervals both exclude zero: the hierarchical bootstrap
# (seeds and examples resampled) and a seed-level Welch–Satterthwaite interval (each seed's mean one
# observation). With two or three seeds per arm a bootstrap has few distinct seed means to draw, so it
# understates seed-to-seed variance; the t interval does not. A comparison where either arm has a single
# run has no seed replication: it shows no interval and is never resolved.
LEVEL = 0.95
# How each metric is averaged, stated in every table: benchmarks per document within a task, then the
# tasks' unweighted mean; fidelity per held-out chat (each chat's per-token mean, then the mean over
# chats: what the bootstrap resamples); perplexity per token of its text; the held-out divergence as the
# trainer evaluates it (the mean over batches of each batch's per-token loss).
WEIGHTING = {"average": "per document, tasks averaged equally", "perplexity": "per token (one number per run)",
             "heldout_loss_after": "per held-out batch (the trainer's evaluation loss; one number per run)"}
FIDELITY_WEIGHTING = "per chat (each chat's per-token mean)"


GENERATION_WEIGHTING = "per prompt (each prompt's mean over its outputs)"
GENERATION_NAMES = {f"gen_{mode}/{metric}": f"{name}, {mode} outputs"
                    for mode in ("greedy", "sampled")
                    for metric, name in (("correct", "task correctness"), ("rouge_l", "ROUGE-L"),
                                         ("teacher_nll", "teacher NLL of the output"), ("tokens", "output tokens"),
                                         ("hit_cap", "share of outputs at the length cap"),
                                         ("repetition", "repeated 4-grams"))}


def generation_frame(roots: Any, as_sweep: str = "") -> pd.DataFrame:
    """Per-prompt generation metrics of every model, greedy and sampled, named ``gen_<mode>/<metric>``:
    ``per_example_fidelity``'s layout, so the λ comparisons resample prompts as they resample chats."""
    frames = []
    for mode in ("greedy", "sampled"):
        frame = results.per_example_generation(roots, as_sweep, mode)
        if not frame.empty:
            frames.append(frame.assign(metric="gen_" + mode + "/" + frame["metric"]))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def generation_runs(frame: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """One row per student run of the generation frame: its ``keys``, ``seed``, ``arm`` (:func:`arm_label`) and
    each metric's per-prompt mean (the weighting of every generation number)."""
    students = frame[frame["role"] == "student"]
    if students.empty:
        return pd.DataFrame()
    values = students.groupby(["run", "metric"])["value"].mean().unstack("metric")
    meta = students.drop_duplicates("run").set_index("run")[[*keys, "seed"]]
    runs = meta.join(values).reset_index().sort_values([*keys, "seed"], kind="stable")
    runs["arm"] = [arm_label({k: row[k] for k in keys}) for _, row in runs.iterrows()]
    return runs


def generation_references(frame: pd.DataFrame, metrics: list[str]) -> dict[str, dict[str, float]]:
    """The teacher's and each baseline's per-prompt mean of ``metrics`` ({name: {metric: mean}})."""
    levels = {}
    for role, name in REFERENCE_NAMES.items():
        part = frame[(frame["role"] == role) & frame["metric"].isin(metrics)]
        if not part.empty:
            levels[name] = part.groupby(["metric", "id"])["value"].mean().groupby("metric").mean().to_dict()
    return levels


def paired_run_difference(frame: pd.DataFrame, run_a: str, run_b: str, metrics: list[str]) -> pd.DataFrame:
    """Two student runs' per-prompt means of ``metrics`` on the prompts both scored, and ``b − a``: one row
    per metric (``a``, ``b``, ``difference``, ``prompts``). One run per side, so no interval: how far the
    difference is from noise is read against the seed-to-seed spread of the same arm."""
    students = frame[(frame["role"] == "student") & frame["metric"].isin(metrics)]
    rows = []
    for metric in metrics:
        part = students[students["metric"] == metric]
        a = part[part["run"] == run_a].groupby("id")["value"].mean()
        b = part[part["run"] == run_b].groupby("id")["value"].mean()
        shared = a.index.intersection(b.index)
        if shared.empty:
            continue
        mean_a, mean_b = float(a.loc[shared].mean()), float(b.loc[shared].mean())
        rows.append({"metric": metric, "a": mean_a, "b": mean_b, "difference": mean_b - mean_a,
                     "prompts": len(shared)})
    return pd.DataFrame(rows)


def generation_gap_recovered(frame: pd.DataFrame, keys: tuple[str, ...] = ("lmbda",)) -> pd.DataFrame:
    """Each student's fraction of the teacher-to-PTQ gap recovered per generation metric, (student − PTQ) /
    (teacher − PTQ) of per-prompt means on the prompts all three scored, then mean, sd and seeds per
    condition (``keys``). 1: the teacher's quality; 0: no better than PTQ."""
    rows = []
    for (run, metric), models in frame.groupby(["run", "metric"], sort=True):
        means = {}
        for role in ("student", "ptq", "teacher"):
            part = models[models["role"] == role]
            means[role] = part.set_index("id")["value"]
        shared = means["student"].index.intersection(means["ptq"].index).intersection(means["teacher"].index)
        if shared.empty:
            continue
        student, ptq, teacher = (float(means[r].loc[shared].mean()) for r in ("student", "ptq", "teacher"))
        gap = teacher - ptq
        config = models[models["role"] == "student"].iloc[0]
        rows.append({**{k: config[k] for k in keys}, "seed": config.get("seed"), "run": run, "metric": metric,
                     "recovered": (student - ptq) / gap if gap else np.nan})
    if not rows:
        return pd.DataFrame()
    table = pd.DataFrame(rows)
    return (table.groupby([*keys, "metric"])["recovered"].agg(["mean", "std", "count"])
            .rename(columns={"count": "seeds"}).reset_index())


# How a learning-rate pilot chooses each λ's rate: greedy outputs' quality on the validation prompts, which is
# neither regime's training signal (forward KL on dataset text is λ=0's, reverse KL on own samples λ=1's).
RATE_CRITERIA = ("gen_greedy/rouge_l", "gen_greedy/teacher_nll")
LOWER_IS_BETTER = ("teacher_nll", "loss", "kl", "perplexity", "hit_cap", "repetition")


def lower_is_better(metric: str) -> bool:
    return any(word in metric for word in LOWER_IS_BETTER)


def rate_choice(students: pd.DataFrame, keys: tuple[str, ...] = ("lmbda",), rate: str = "learning_rate",
                criteria: tuple[str, ...] = RATE_CRITERIA,
                tolerance: Mapping[str, float] | None = None) -> pd.DataFrame:
    """Each condition's (``keys``) rates, the criteria's means over its seeds, and ``chosen``: per condition the
    rate best on the first criterion; ``agrees`` says whether the second criterion picks the same rate.

    ``tolerance`` (per criterion, typically its minimum detectable difference from :func:`generation_power`)
    makes the first criterion's near-ties explicit: the rates within it of the best (``tied``) are ones the
    pilot cannot tell apart on that criterion, and the second criterion chooses among them. Without it, a
    margin far below what the prompts can resolve would decide the rate."""
    criteria = tuple(c for c in criteria if c in students)
    if not criteria or rate not in students:
        return pd.DataFrame()
    table = students.groupby([*keys, rate])[list(criteria)].mean().reset_index()
    table["seeds"] = students.groupby([*keys, rate]).size().to_numpy()
    margin = float((tolerance or {}).get(criteria[0], 0.0))

    def best(part: pd.DataFrame, metric: str) -> Any:
        values = part[metric]
        return part.loc[values.idxmin() if lower_is_better(metric) else values.idxmax(), rate]

    def near_best(part: pd.DataFrame, metric: str) -> pd.Series:
        values = part[metric]
        gap = values - values.min() if lower_is_better(metric) else values.max() - values
        return gap <= margin

    chosen, agrees, tied = {}, {}, pd.Series(False, index=table.index)
    for key, part in table.groupby(list(keys)):
        near = near_best(part, criteria[0])
        tied.loc[part.index] = near & (near.sum() > 1)
        chosen[key] = best(part[near], criteria[1]) if len(criteria) > 1 and near.sum() > 1 else best(
            part, criteria[0])
        agrees[key] = len(criteria) < 2 or best(part, criteria[1]) == best(part, criteria[0])
    condition = [tuple(row) for row in table[list(keys)].itertuples(index=False)]  # groupby's keys are tuples
    table["tied"] = tied.to_numpy()
    table["chosen"] = [rate_value == chosen[c] for rate_value, c in zip(table[rate], condition, strict=True)]
    table["agrees"] = [agrees[c] for c in condition]
    return table


def rate_tolerance(frame: pd.DataFrame, criteria: tuple[str, ...] = RATE_CRITERIA) -> dict[str, float]:
    """Each rate criterion's minimum detectable paired difference at the pilot's own prompts
    (:func:`generation_power` on ``frame``, the long generation frame): :func:`rate_choice`'s ``tolerance``."""
    power = generation_power(frame)
    if power.empty:
        return {}
    return {m: float(v) for m, v in zip(power["metric"], power["mde"], strict=True) if m in criteria}


def generation_power(frame: pd.DataFrame, planned_prompts: int | None = None, power: float = 0.8,
                     level: float = LEVEL) -> pd.DataFrame:
    """What a generation metric can resolve, before a study spends its seeds on it.

    Per metric, on the prompts the teacher and PTQ both scored (every run's baselines pooled; they are the
    same models): the teacher-to-PTQ gap (``gap``, teacher − PTQ) with its paired ``level`` interval over
    prompts, and the smallest student-vs-student difference a paired comparison on ``planned_prompts``
    prompts (default: the prompts here) detects with ``power`` at that level: ``mde`` = (t + z) · sd / √n,
    sd being the per-prompt sd of two students' differences where the frame has pairs of students (runs
    that differ in λ or rate, on the same prompts), else of the teacher−PTQ difference. ``mde_over_gap``:
    that difference as a share of the gap. It is the prompt-sampling floor only: seed-to-seed variation
    adds to it, and only a seed-replicated study measures that."""
    from scipy import stats

    rows = []
    for metric, part in frame.groupby("metric", sort=True):
        by_role = {role: part[part["role"] == role].groupby("id")["value"].mean() for role in ("teacher", "ptq")}
        shared = by_role["teacher"].index.intersection(by_role["ptq"].index)
        if len(shared) < 2:
            continue
        diff = by_role["teacher"].loc[shared] - by_role["ptq"].loc[shared]
        n = len(diff)
        gap, gap_sd = float(diff.mean()), float(diff.std(ddof=1))
        half = float(stats.t.ppf(0.5 + level / 2, n - 1) * gap_sd / np.sqrt(n))
        students = part[part["role"] == "student"].pivot_table(index="id", columns="run", values="value")
        pair_sds = [float((students[a] - students[b]).dropna().std(ddof=1))
                    for i, a in enumerate(students.columns) for b in students.columns[i + 1:]
                    if (students[a] - students[b]).notna().sum() >= 2]
        sd, sd_from = (float(np.sqrt(np.mean(np.square(pair_sds)))), "student pairs") if pair_sds else (
            gap_sd, "teacher − PTQ")
        planned = planned_prompts or n
        mde = float((stats.t.ppf(0.5 + level / 2, planned - 1) + stats.norm.ppf(power)) * sd / np.sqrt(planned))
        rows.append({"metric": metric, "prompts": n, "teacher": float(by_role["teacher"].loc[shared].mean()),
                     "ptq": float(by_role["ptq"].loc[shared].mean()), "gap": gap, "gap_low": gap - half,
                     "gap_high": gap + half, "gap_resolved": excludes_zero(gap - half, gap + half),
                     "planned_prompts": planned, "pair_sd": sd, "sd_from": sd_from, "mde": mde,
                     "mde_over_gap": abs(mde / gap) if gap else np.nan})
    return pd.DataFrame(rows)


def weighting(metric: str) -> str:
    """How ``metric`` is averaged over its examples (one weighting per metric, in every table)."""
    if metric in WEIGHTING:
        return WEIGHTING[metric]
    if metric.startswith("gen_"):
        return GENERATION_WEIGHTING
    if metric in FIDELITY_NAMES and metric != "perplexity":
        return FIDELITY_WEIGHTING
    return "per document" if "/" in metric else "one number per run"


def seed_level_interval(a: Any, b: Any, level: float = LEVEL) -> tuple[float, float, float, float]:
    """Mean of ``b`` minus mean of ``a`` with its Welch–Satterthwaite ``level`` interval, each value one
    seed's mean: (delta, low, high, degrees of freedom). Without seed replication (fewer than two
    values on either side) the interval is NaN: no interval, never resolved."""
    from scipy import stats

    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    delta = float(b.mean() - a.mean()) if len(a) and len(b) else np.nan
    if len(a) < 2 or len(b) < 2:
        return delta, np.nan, np.nan, np.nan
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    se = np.sqrt(va + vb)
    if se == 0:  # identical seeds on both sides: the interval is the point
        return delta, delta, delta, np.inf
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    half = float(stats.t.ppf(0.5 + level / 2, df) * se)
    return delta, delta - half, delta + half, float(df)


def excludes_zero(low: float, high: float) -> bool:
    return bool(not (pd.isna(low) or pd.isna(high)) and (low > 0 or high < 0))


@dataclass
class BootstrapResult:
    a: str
    b: str
    delta: float  # mean of b minus a, macro-averaged over groups (benchmark tasks; a metric's examples)
    ci_low: float  # hierarchical bootstrap (seeds and units resampled)
    ci_high: float
    p_value: float
    documents: int
    seeds_a: int
    seeds_b: int
    per_task: pd.DataFrame
    samples: np.ndarray
    seed_low: float = np.nan  # seed-level Welch–Satterthwaite interval (NaN without seed replication)
    seed_high: float = np.nan
    seed_df: float = np.nan

    @property
    def replicated(self) -> bool:
        """Both conditions have at least two seeds: without them no interval is shown."""
        return self.seeds_a >= 2 and self.seeds_b >= 2

    @property
    def resolved(self) -> bool:
        """The rule: seed-replicated, and both intervals exclude zero."""
        return (self.replicated and excludes_zero(self.ci_low, self.ci_high)
                and excludes_zero(self.seed_low, self.seed_high))


def _is_num(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _cond_name(cond: dict[str, Any]) -> str:
    return ", ".join(f"{_symbol(k)}={format_value(v)}" for k, v in cond.items())


def _select(frame: pd.DataFrame, cond: dict[str, Any]) -> pd.DataFrame:
    sel = frame[frame["role"] == "student"] if "role" in frame else frame
    for key, value in cond.items():
        sel = sel[np.isclose(sel[key].astype(float), float(value))] if _is_num(value) else sel[sel[key] == value]
    if sel.empty:
        raise ValueError(f"no per-example results for {cond}")
    return sel


def hierarchical_bootstrap(pe: pd.DataFrame, a: dict[str, Any], b: dict[str, Any], value: str = "acc",
                           group: str = "task", unit: tuple[str, ...] = ("subject", "doc_id"), n_boot: int = 10_000,
                           seed: int = 0, a_name: str | None = None, b_name: str | None = None,
                           resample_seeds: bool = True) -> BootstrapResult:
    """Bootstrap of condition ``b`` minus ``a`` over *both* sources of noise: seeds and documents.

    ``pe`` has one row per (run, ``group``, ``unit``) with its ``value`` (``per_example()`` rows for
    benchmarks, ``per_example_fidelity()`` rows for fidelity). Each replicate resamples, with
    replacement, the runs (seeds) of each condition independently, and the units within each group
    (the same draw for both conditions: the comparison is paired over documents); its statistic is
    the unweighted mean over groups of the mean over drawn units of (mean over b's drawn runs -
    mean over a's drawn runs). Units are those every run of both conditions was scored on. With a
    single seed per condition this is the paired document bootstrap; with seeds that disagree, the
    interval widens by the seed-to-seed variance that a document-only bootstrap would ignore.
    ``resample_seeds=False`` keeps every run at equal weight: the document-only bootstrap.
    The result also carries the seed-level interval (:func:`seed_level_interval` of the runs' means)
    and ``resolved`` under the rule.
    """
    rng = np.random.default_rng(seed)
    unit = [u for u in unit if u in pe.columns]
    mats = []
    for cond in (a, b):
        sel = _select(pe, cond)
        sel = sel.assign(**{u: sel[u].fillna("") for u in unit})  # pivot tables drop missing keys
        mats.append(sel.pivot_table(index=[group, *unit], columns="run", values=value, aggfunc="first"))
    joined = mats[0].join(mats[1], how="inner", lsuffix="_a", rsuffix="_b").dropna()
    if joined.empty:
        raise ValueError("the two conditions share no evaluated units")
    n_a, n_b = mats[0].shape[1], mats[1].shape[1]
    groups = list(dict.fromkeys(joined.index.get_level_values(0)))
    groups.sort(key=lambda t: list(BENCHMARKS).index(t) if t in BENCHMARKS else 99)
    boot = np.zeros(n_boot)
    # Seed draws are shared by all groups of a replicate: a run is one student across benchmarks.
    if resample_seeds:
        w_a = rng.multinomial(n_a, np.full(n_a, 1 / n_a), size=n_boot) / n_a
        w_b = rng.multinomial(n_b, np.full(n_b, 1 / n_b), size=n_boot) / n_b
    else:
        w_a, w_b = np.full((n_boot, n_a), 1 / n_a), np.full((n_boot, n_b), 1 / n_b)
    rows, seed_a, seed_b = [], [], []
    for g in groups:
        part = joined.xs(g, level=0).to_numpy(dtype=float)
        va, vb = part[:, :n_a], part[:, n_a:]
        diff = w_b @ vb.T - w_a @ va.T  # [n_boot, units]: seed-resampled difference per unit
        n_units = part.shape[0]
        counts = rng.multinomial(n_units, np.full(n_units, 1 / n_units), size=n_boot)
        group_boot = (counts * diff).sum(axis=1) / n_units
        boot += group_boot / len(groups)
        point = float((vb.mean(axis=1) - va.mean(axis=1)).mean())
        rows.append({"task": BENCHMARKS.get(g, g), "documents": n_units, "a": float(va.mean()), "b": float(vb.mean()),
                     "delta": point, "ci_low": np.quantile(group_boot, 0.025),
                     "ci_high": np.quantile(group_boot, 0.975)})
        seed_a.append(va.mean(axis=0))
        seed_b.append(vb.mean(axis=0))
    per_task = pd.DataFrame(rows).set_index("task")
    delta = float(per_task["delta"].mean())
    p = 2 * min((boot <= 0).mean(), (boot >= 0).mean())
    # Each seed's mean over the shared units, macro-averaged over groups as the statistic is.
    _, seed_low, seed_high, seed_df = seed_level_interval(np.mean(seed_a, axis=0), np.mean(seed_b, axis=0))
    return BootstrapResult(a_name or _cond_name(a), b_name or _cond_name(b), delta,
                           float(np.quantile(boot, 0.025)), float(np.quantile(boot, 0.975)), float(min(1.0, p)),
                           len(joined), n_a, n_b, per_task, boot, seed_low, seed_high, seed_df)


# Fidelity metrics: which direction is better, for reading a difference.
HIGHER_IS_BETTER = {"top1_agreement", "top1_agreement_matched", "average",
                    *(f"gen_{mode}/{m}" for mode in ("greedy", "sampled") for m in ("correct", "rouge_l"))}


def compare_conditions(pe: pd.DataFrame, pef: pd.DataFrame, students: pd.DataFrame, key: str = "lmbda",
                       metric: str = "acc", n_boot: int = 10_000, seed: int = 0,
                       run_metrics: tuple[str, ...] = ("perplexity", "heldout_loss_after")) -> pd.DataFrame:
    """Every pair of values of ``key`` among the students, compared on every metric, under the rule.

    Benchmarks (macro average over tasks) and each fidelity metric use :func:`hierarchical_bootstrap`
    over seeds and documents / held-out examples; ``run_metrics`` (one number per run, such as
    perplexity) resample seeds only. Columns: ``delta``; the bootstrap's ``ci_low``/``ci_high`` and the
    seed-level ``seed_low``/``seed_high`` (both NaN without seed replication); ``resolved`` (both
    exclude zero); ``weighting`` (how the metric is averaged). Arguments: ``per_example()``,
    ``per_example_fidelity()`` and the wide student rows.
    """
    values = sorted(students[key].dropna().unique()) if key in students else []
    pairs = [({key: low}, {key: high}) for i, low in enumerate(values) for high in values[i + 1:]]
    return compare_pairs(pe, pef, students, pairs, metric=metric, n_boot=n_boot, seed=seed, run_metrics=run_metrics)


def arm_label(cond: dict[str, Any]) -> str:
    """An arm's name from its condition, e.g. ``λ=0, 159 steps``."""
    return ", ".join(f"{format_value(v)} steps" if k == "max_steps" else f"{_symbol(k)}={format_value(v)}"
                     for k, v in cond.items())


def arm_pairs(students: pd.DataFrame, keys: list[str], key: str = "lmbda") -> list[tuple[dict, dict]]:
    """The pairs of arms (conditions over ``keys``) that differ in ``key``, each as (lower ``key``, higher): for
    a study whose arms are λ=0 and λ=1 at 100 steps and λ=0 at 159, the step-matched pair (λ=0 and λ=1 at 100)
    and the FLOP-matched pair (λ=0 at 159, λ=1 at 100)."""
    arms = students[keys].drop_duplicates().sort_values(keys).to_dict("records")
    return [(a, b) for a in arms for b in arms if a[key] < b[key]]


def compare_pairs(pe: pd.DataFrame, pef: pd.DataFrame, students: pd.DataFrame,
                  pairs: list[tuple[dict[str, Any], dict[str, Any]]], metric: str = "acc", n_boot: int = 10_000,
                  seed: int = 0, run_metrics: tuple[str, ...] = ("perplexity", "heldout_loss_after")) -> pd.DataFrame:
    """Each pair (``a``, ``b``) of conditions compared as b − a on every metric under the rule, as in
    :func:`compare_conditions` (which compares the values of one parameter)."""
    rows = []
    for a, b in pairs:
        high, low = arm_label(b), arm_label(a)
        name = f"{high} − {low}"
        found: list[tuple[str, BootstrapResult]] = []
        if not pe.empty:
            found.append(("average", hierarchical_bootstrap(pe, a, b, metric, n_boot=n_boot, seed=seed)))
        for fid_metric, frame in (pef.groupby("metric", sort=False) if not pef.empty else []):
            frame = frame.assign(group=fid_metric)
            found.append((fid_metric, hierarchical_bootstrap(frame, a, b, "value", group="group", unit=("id",),
                                                             n_boot=n_boot, seed=seed)))
        for run_metric in run_metrics:
            if run_metric in students and students[run_metric].notna().any():
                frame = students[["run", "role", *dict.fromkeys([*a, *b]), run_metric]].dropna().assign(
                    group=run_metric, unit=0)
                found.append((run_metric, hierarchical_bootstrap(frame, a, b, run_metric, group="group",
                                                                 unit=("unit",), n_boot=n_boot, seed=seed)))
        for what, result in found:
            rows.append(_comparison_row(name, what, result, high, low))
    return pd.DataFrame(rows)


def _comparison_row(name: str, metric: str, result: BootstrapResult, high: str, low: str) -> dict[str, Any]:
    """One row of a comparison table under the rule: no interval without seed replication."""
    shown = result.replicated
    better = (result.delta > 0) == (metric in HIGHER_IS_BETTER)
    return {"comparison": name, "metric": metric, "weighting": weighting(metric), "delta": result.delta,
            "ci_low": result.ci_low if shown else np.nan, "ci_high": result.ci_high if shown else np.nan,
            "seed_low": result.seed_low, "seed_high": result.seed_high, "resolved": result.resolved,
            "favours": (high if better else low) if result.resolved else "neither (unresolved)",
            "seeds": f"{result.seeds_b} vs {result.seeds_a}", "units": result.documents}


COMPARISON_COLUMNS = ["comparison", "metric", "weighting", "delta", "ci_low", "ci_high", "seed_low", "seed_high",
                      "resolved", "favours", "seeds", "units"]


def describe_difference(row: Any, name: str, digits: int = 3) -> str:
    """One generated sentence for a comparison row: the difference, its intervals and the verdict."""
    delta = f"{row['delta']:+.{digits}f}"
    if pd.isna(row["ci_low"]) or pd.isna(row["seed_low"]):
        return (f"{name}: {row['comparison']} = {delta} ({row['seeds']} seeds: no seed replication, so no "
                f"interval; not resolved).")
    intervals = (f"bootstrap [{row['ci_low']:+.{digits}f}, {row['ci_high']:+.{digits}f}], seed-level "
                 f"[{row['seed_low']:+.{digits}f}, {row['seed_high']:+.{digits}f}]")
    boot, seed = excludes_zero(row["ci_low"], row["ci_high"]), excludes_zero(row["seed_low"], row["seed_high"])
    reason = ("both intervals include zero" if not (boot or seed) else
              "the seed-level interval includes zero" if boot else "the bootstrap interval includes zero")
    verdict = f"resolved, favouring {row['favours']}" if row["resolved"] else f"not resolved ({reason})"
    return f"{name}: {row['comparison']} = {delta}, 95% {intervals}; {verdict}."


def summarize_comparisons(table: pd.DataFrame, names: dict[str, str], digits: int = 3) -> str:
    """Generated markdown: a count of resolved differences and one sentence per metric."""
    if table.empty:
        return ""
    lines = [f"**{int(table['resolved'].sum())} of {len(table)} differences resolved** (both 95% intervals "
             f"exclude zero)."]
    for _, row in table.iterrows():
        lines.append(f"- {describe_difference(row, names.get(row['metric'], row['metric']), digits)}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- the quantization ladder
RUNG_ORDER = ("int8", "int4", "int3", "int2")  # from the teacher outwards
LADDER_METRICS = ("forward_kl", "forward_kl_matched", "reverse_kl_on_policy", "teacher_nll_of_student_greedy",
                  "perplexity", "average")


def rungs(frame: pd.DataFrame, rung: str = "quant_type", students_only: bool = True) -> list[str]:
    """The rungs present among ``frame``'s students (or, with ``students_only=False``, its quantized
    models of any role: a baselines-only rung too), nearest the teacher first."""
    rows = frame["role"] == "student" if students_only else frame["role"] != "teacher"
    present = frame.loc[rows, rung].dropna().unique() if rung in frame else []
    return sorted(present, key=lambda q: (RUNG_ORDER.index(q) if q in RUNG_ORDER else 99, str(q)))


def ladder_effects(pe: pd.DataFrame, pef: pd.DataFrame, students: pd.DataFrame, key: str = "lmbda",
                   rung: str = "quant_type", n_boot: int = 10_000, seed: int = 0) -> pd.DataFrame:
    """Per rung, every comparison of ``key`` (:func:`compare_conditions`, intervals over seeds and
    examples), beside how far that rung's round-to-nearest PTQ model sits from the teacher
    (``ptq_forward_kl``: its mean forward KL on the same held-out chats).

    The ladder's question: does on-policy's advantage grow as the student is pushed further away?
    """
    out = []
    for q in rungs(students, rung):
        def at(frame: pd.DataFrame, q: str = q) -> pd.DataFrame:
            return frame[frame[rung] == q] if not frame.empty else frame

        table = compare_conditions(at(pe), at(pef), at(students), key, n_boot=n_boot, seed=seed)
        ptq = at(pef)
        ptq = ptq[(ptq["role"] == "ptq") & (ptq["metric"] == "forward_kl")]["value"] if not ptq.empty else ptq
        table.insert(0, rung, q)
        table["ptq_forward_kl"] = float(ptq.mean()) if len(ptq) else np.nan
        out.append(table)
    return pd.concat(out, ignore_index=True) if out else pd.DataFrame()


def ladder_table(w: pd.DataFrame, columns: list[str] | None = None, key: str = "lmbda",
                 rung: str = "quant_type") -> pd.DataFrame:
    """Per rung, side by side: the teacher, every quantized baseline of that bit width (RTN PTQ, GPTQ,
    AWQ; the original's int4 recipes under int4) and the students by ``key``; mean, sd and seeds. A rung
    evaluated without students (``sweep --baselines-only``) has its baselines alone."""
    w = with_average(w)
    if columns is None:
        columns = [c for c in LADDER_METRICS if c in w.columns]
    parts = {}
    for q in rungs(w, rung, students_only=False):
        part = condition_table(w[(w["role"] == "teacher") | (w[rung] == q)], [key], columns)
        if not part.empty:
            parts[q] = part
    return pd.concat(parts, names=[rung, "condition"]) if parts else pd.DataFrame()


def heldout_curves(roots: Any, as_sweep: str = "") -> pd.DataFrame:
    """The held-out divergence during training of every run under ``roots``: run, step, loss, config."""
    from onpolicy_lib import results
    from onpolicy_lib.rundir import Run

    rows = []
    for sweep, run_dir, train in results.find_runs(roots, as_sweep):
        for point in (Run(run_dir).metrics or {}).get("heldout_curve", []):
            rows.append({"sweep": sweep, "run": f"{run_dir.parent.name}/{run_dir.name}", "lmbda": train.get("lmbda"),
                         "seed": train.get("seed"), "quant_type": train.get("quant_type"), **point})
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------- generated sentences
def _fmt(value: float, digits: int = 3) -> str:
    return f"{value:.{digits}g}" if abs(value) >= 1000 or (value and abs(value) < 0.001) else f"{value:.{digits}f}"


def describe_conditions(table: pd.DataFrame, column: str, name: str, higher_is_better: bool = True) -> str:
    """One generated sentence: each condition's mean (± sd over seeds or evaluations) of ``column``."""
    if table.empty or (column, "mean") not in table:
        return ""
    parts = []
    for condition, row in table.iterrows():
        mean, sd, n = row[(column, "mean")], row[(column, "sd")], row[(column, "n")]
        if pd.isna(mean):
            continue
        spread = f" ± {_fmt(sd)} ({int(n)})" if n > 1 else ""
        parts.append(f"{condition} {_fmt(mean)}{spread}")
    direction = "higher" if higher_is_better else "lower"
    return (f"{name[0].upper() + name[1:]}, {weighting(column)}, {direction} is better (± sd over n seeds or "
            f"evaluations): " + "; ".join(parts) + ". Differences between λ values, with their intervals, are "
            "in the comparisons.")


# The one number a cost or extended-training plot sets against cost, by what a sweep evaluated: the benchmark
# average, else the forward KL to the teacher, else the generation study's best-powered metric, else the
# held-out divergence every run records.
QUALITY_METRICS = ("average", "forward_kl", "gen_greedy/teacher_nll", "heldout_loss_after")


def quality_metric(frame: pd.DataFrame) -> str:
    """The first of :data:`QUALITY_METRICS` that ``frame`` has values for."""
    for metric in QUALITY_METRICS:
        if metric in frame and frame[metric].notna().any():
            return metric
    raise ValueError(f"frame has none of the quality metrics {', '.join(QUALITY_METRICS)}")


def describe_cost(students: pd.DataFrame) -> str:
    """Generated sentences: each condition's median step and training wall time, relative to λ=0's."""
    keys = [k for k in ("quant_type", "lmbda") if k in students and students[k].nunique() > 1] or ["lmbda"]
    if "median_step_s" not in students:
        return ""
    groups = students.groupby(keys)[["median_step_s", "wall_time_s"]].mean()
    lines = []
    for index, row in groups.iterrows():
        index = index if isinstance(index, tuple) else (index,)
        label = ", ".join(str(v) if k == "quant_type" else f"{_symbol(k)}={format_value(v)}"
                          for k, v in zip(keys, index, strict=True))
        key0 = (*index[:-1], 0.0) if len(keys) > 1 else 0.0
        ref = groups.loc[key0] if keys[-1] == "lmbda" and key0 in groups.index else None
        ratio = (f" ({row['median_step_s'] / ref['median_step_s']:.2f}× λ=0's)"
                 if ref is not None and index[-1] != 0 else "")
        lines.append(f"{label}: median step {row['median_step_s']:.2f} s{ratio}, training wall time "
                     f"{row['wall_time_s']:.0f} s")
    return ("Mean over seeds (wall times include any pauses; the median step is the cleaner measure): "
            + "; ".join(lines) + ".")


def describe_curves(curves: pd.DataFrame) -> str:
    """Generated sentences: how much each condition's held-out divergence still fell over its last interval."""
    keys = [k for k in ("quant_type", "lmbda") if k in curves and curves[k].nunique() > 1] or ["lmbda"]
    lines = []
    for index, part in curves.groupby(keys):
        index = index if isinstance(index, tuple) else (index,)
        mean = part.groupby("step")["loss"].mean()
        if len(mean) < 2:
            continue
        before, after = mean.iloc[-2], mean.iloc[-1]
        label = ", ".join(str(v) if k == "quant_type" else f"{_symbol(k)}={format_value(v)}"
                          for k, v in zip(keys, index, strict=True))
        lines.append(f"{label} {before:.4f} → {after:.4f} ({100 * (after - before) / before:+.1f}%, steps "
                     f"{mean.index[-2]}–{mean.index[-1]})")
    return ("Over the last evaluation interval (mean over seeds), the held-out divergence went: "
            + "; ".join(lines) + ".") if lines else ""


# ---------------------------------------------------------------------------- compute cost
COMPUTE_COLUMNS = {"wall_time_s": "train wall time (s)", "rollout_seconds": "rollout time (s)",
                   "tokens_generated": "tokens generated", "tokens_trained": "tokens trained on",
                   "flops": "training FLOPs (generation included)", "median_step_s": "median step (s)",
                   "peak_memory_mb": "peak memory (MB)"}


def compute_table(w: pd.DataFrame, keys: list[str] | None = None) -> pd.DataFrame:
    """Training cost per condition (mean over seeds) beside its quality."""
    w = with_average(w)
    keys = varying(w) if keys is None else keys
    columns = [c for c in [*COMPUTE_COLUMNS, "average", "forward_kl", "heldout_loss_after"] if c in w.columns]
    table = condition_table(w, keys, columns, baselines=False)
    if table.empty:
        return table
    means = table.xs("mean", axis=1, level=1).rename(columns={**COMPUTE_COLUMNS, "average": "benchmark average"})
    return means


# ---------------------------------------------------------------------------- the original study
def reference_study() -> pd.DataFrame:
    """The original study's published numbers (Qwen3-4B, 10k steps), one row per table row."""
    return pd.read_csv(REFERENCE_CSV, comment="#")


def gap_to_teacher(w: pd.DataFrame) -> pd.DataFrame:
    """Student minus teacher accuracy per benchmark and λ, ours and the original study's, long format."""
    rows = []
    ours = with_average(w)
    teacher = ours[ours["role"] == "teacher"]
    if not teacher.empty:
        t = teacher.iloc[0]
        model = t.get("model_name") or "this model"
        for lmbda, group in ours[ours["role"] == "student"].groupby("lmbda"):
            for task, name in BENCHMARKS.items():
                col = f"{task}/acc"
                if col in group:
                    rows.append({"study": f"this tool ({model}, CPU)", "lmbda": lmbda, "benchmark": name,
                                 "gap": group[col].mean() - t[col]})
    ref = reference_study()
    ref_teacher = ref[ref["model"] == "teacher"].iloc[0]
    for _, row in ref[ref["table"] == "main"].iterrows():
        for task, name in BENCHMARKS.items():
            rows.append({"study": "original (Qwen3-4B, 10k GPU steps)", "lmbda": row["lmbda"], "benchmark": name,
                         "gap": row[task] - ref_teacher[task]})
    return pd.DataFrame(rows)

