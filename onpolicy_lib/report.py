"""The study's report: ``notebooks/report.ipynb`` -> ``REPORT.md`` (+ ``report/REPORT.html``, figures in
``report/figures/``), every number computed here from the committed ``outputs/``.

The notebook calls the section functions below, each returning markdown whose numbers are formatted
from DataFrames (``results`` and ``analysis``); ``python -m onpolicy_lib.report`` executes it with
papermill and writes the report. Fixed bootstrap seeds, no timestamps and stripped notebook metadata
make the output a function of the committed files alone, so a test re-renders it and compares.
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from onpolicy_lib import analysis, results
from onpolicy_lib.config import BENCHMARKS, PROJECT_ROOT, format_value
from onpolicy_lib.rundir import Run, read_manifest

NOTEBOOK = PROJECT_ROOT / "notebooks" / "report.ipynb"
OUTPUTS = PROJECT_ROOT / "outputs"
# Resamples and seed of every bootstrap in the report: the analyses' own count, so the report's intervals
# are the rendered analyses' intervals.
N_BOOT = 10_000
BOOT_SEED = 0
# The committed studies the report reads, each as its analysis reads it.
PROTOCOL, LONG, GEMMA, LADDER = "cpu_protocol", "cpu_protocol_long", "cpu_gemma", "cpu_ladder"
ROOTS = {PROTOCOL: ([PROTOCOL], ""), LONG: ([LONG], ""), GEMMA: ([GEMMA], ""), LADDER: ([LADDER, GEMMA], LADDER)}
LR_PROBE = "cpu_gemma_lr_probe"
# Rows of the comparison tables, in reading order.
METRICS = ("forward_kl", "forward_kl_matched", "top1_agreement", "top1_agreement_matched", "reverse_kl_on_policy",
           "teacher_nll_of_student_greedy", "perplexity", "average", "heldout_loss_after")
MATCHED = "on the first rollout-length positions"
NAMES = {**analysis.FIDELITY_NAMES, "average": "benchmark average", "heldout_loss_after": "held-out divergence",
         "forward_kl": "forward KL, dataset completions", "forward_kl_matched": f"forward KL {MATCHED}",
         "top1_agreement": "top-1 agreement", "top1_agreement_matched": f"top-1 agreement {MATCHED}",
         "reverse_kl_on_policy": "reverse KL, own samples", "teacher_nll_of_student_greedy":
         "teacher NLL of greedy output", "perplexity": "perplexity"}


# ---------------------------------------------------------------------------- numbers
def decimals(value: float, digits: int = 3) -> int:
    """Decimals that show ``digits`` significant digits of ``value`` (at most 6)."""
    if value is None or pd.isna(value) or value == 0:
        return digits
    return int(min(6, max(0, digits - 1 - np.floor(np.log10(abs(value))))))


def num(value: float, digits: int = 3, sign: bool = False, places: int | None = None) -> str:
    """``digits`` significant digits (or ``places`` decimals); × 10^k from 10⁵ up (readers compare decimals)."""
    if value is None or pd.isna(value):
        return "–"
    if abs(value) >= 1e5:
        mantissa, exponent = f"{value:.{digits - 1}e}".split("e")
        return f"{'+' if sign and value > 0 else ''}{mantissa} × 10^{int(exponent)}"
    places = decimals(value, digits) if places is None else places
    return f"{value:+.{places}f}" if sign else f"{value:.{places}f}"


def difference(row: pd.Series, digits: int = 3) -> str:
    """A comparison cell: the difference, bold where resolved, then the bootstrap and seed-level intervals,
    all to the decimals that show the difference's ``digits`` significant digits."""
    if pd.isna(row["ci_low"]) or pd.isna(row["seed_low"]):
        return f"{num(row['delta'], digits, sign=True)} (no seed replication: no interval)"
    # One precision for the cell: three significant digits of the larger of the difference and the
    # interval's half-width, so a small difference with a wide interval is not shown to false precision.
    half = max(abs(row[h] - row[lo]) / 2 for lo, h in (("ci_low", "ci_high"), ("seed_low", "seed_high")))
    places = decimals(max(abs(row["delta"]), half), digits)
    delta = num(row["delta"], digits, sign=True, places=places if abs(row["delta"]) < 1e5 else None)
    delta = f"**{delta}**" if row["resolved"] else delta
    bounds = [num(row[k], digits, True, places) for k in ("ci_low", "ci_high", "seed_low", "seed_high")]
    return f"{delta} [{bounds[0]}, {bounds[1]}] [{bounds[2]}, {bounds[3]}]"


def mean_sd(table: pd.DataFrame, condition: str, column: str, digits: int = 3) -> str:
    """``mean ± sd (n)`` (sd to the mean's decimals), or the mean alone for a single run."""
    if condition not in table.index or (column, "mean") not in table:
        return "–"
    mean, sd, n = table.loc[condition, (column, "mean")], table.loc[condition, (column, "sd")], \
        table.loc[condition, (column, "n")]
    if pd.isna(mean):
        return "–"
    if n <= 1:
        return num(mean, digits)
    places = decimals(mean, digits)
    return f"{num(mean, digits)} ± {num(sd, digits, places=places if abs(mean) < 1e5 else None)} ({int(n)})"


def markdown_table(frame: pd.DataFrame, index: str = "") -> str:
    """A pandas frame as a GitHub markdown table (strings as they are)."""
    header = [index, *map(str, frame.columns)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, row in frame.iterrows():
        lines.append("| " + " | ".join([str(label), *map(str, row.values)]) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- the studies
@dataclass
class Study:
    name: str
    w: pd.DataFrame
    pe: pd.DataFrame
    pef: pd.DataFrame
    students: pd.DataFrame
    config: dict[str, Any]  # the first run's config.json


@functools.cache
def study(name: str) -> Study:
    roots, as_sweep = ROOTS[name]
    roots = [OUTPUTS / r for r in roots]
    w = analysis.with_average(results.wide(results.collect(roots, as_sweep)))
    first = sorted((OUTPUTS / name).glob("*/config.json"))[0]
    return Study(name, w, results.per_example(roots, as_sweep), results.per_example_fidelity(roots, as_sweep),
                 w[w["role"] == "student"], json.loads(first.read_text()))


@functools.cache
def comparisons(name: str) -> pd.DataFrame:
    """Every λ comparison of a study (per rung for the ladder), under the rule, at the report's resamples."""
    s = study(name)
    if name == LADDER:
        return analysis.ladder_effects(s.pe, s.pef, s.students, n_boot=N_BOOT, seed=BOOT_SEED)
    return analysis.compare_conditions(s.pe, s.pef, s.students, n_boot=N_BOOT, seed=BOOT_SEED)


def comparison(name: str, metric: str, label: str = "λ=1 − λ=0", rung: str | None = None) -> pd.Series:
    table = comparisons(name)
    table = table[(table["metric"] == metric) & (table["comparison"] == label)]
    if rung is not None:
        table = table[table["quant_type"] == rung]
    if len(table) != 1:
        raise KeyError(f"{name}: no single {label} on {metric}" + (f" at {rung}" if rung else ""))
    return table.iloc[0]


def conditions(name: str, columns: tuple[str, ...] = METRICS, rung: str | None = None) -> pd.DataFrame:
    """Mean, sd and n per condition (teacher, baselines, students by λ), one rung of the ladder if given."""
    w = study(name).w
    if rung is not None:
        w = w[(w["role"] == "teacher") | (w["quant_type"] == rung)]
    return analysis.condition_table(w, ["lmbda"], [c for c in columns if c in w.columns])


def weighting_line(metrics: tuple[str, ...] = METRICS) -> str:
    groups: dict[str, list[str]] = {}
    for metric in metrics:
        groups.setdefault(analysis.weighting(metric), []).append(NAMES.get(metric, metric))
    return "Weighting: " + "; ".join(f"{', '.join(names)}: {how}" for how, names in groups.items()) + "."


def relative(name: str, metric: str, rung: str | None = None) -> float:
    """λ=1 − λ=0 relative to λ=0's mean, both on the same (per-chat) weighting."""
    table = conditions(name, (metric,), rung)
    return float(comparison(name, metric, rung=rung)["delta"] / table.loc["λ=0", (metric, "mean")])


def verdict(row: pd.Series) -> str:
    if pd.isna(row["ci_low"]) or pd.isna(row["seed_low"]):
        return "not resolved (no seed replication)"
    return f"resolved, favouring {row['favours']}" if row["resolved"] else "not resolved"


def _resolved_by_side(table: pd.DataFrame) -> dict[str, list[str]]:
    sides: dict[str, list[str]] = {}
    for _, row in table.iterrows():
        key = row["favours"] if row["resolved"] else "unresolved"
        sides.setdefault(key, []).append(NAMES.get(row["metric"], row["metric"]))
    return sides


def _machines(name: str) -> list[str]:
    roots = ROOTS.get(name, ([name], ""))[0]
    paths = [p for r in roots for p in sorted((OUTPUTS / r).glob("*/config.json"))]
    found = {json.loads(p.read_text()).get("machine") for p in paths}
    return sorted(m for m in found if m)


def _short_machine(machine: str) -> str:
    """"AMD EPYC (family 25, model 17), ..." -> "EPYC 25/17": the CPU type, which is what wall times depend on."""
    found = re.search(r"(EPYC|Xeon|Core)(?:\(R\))?[^(]*\(family (\d+), model (\d+)\)", machine)
    return f"{found.group(1)} {found.group(2)}/{found.group(3)}" if found else machine.split(",")[0]


def _run_machine(run_dir: Path) -> str:
    """The CPU type a run trained on (its ``config.json``), short form; "unknown" where not recorded."""
    path = run_dir / Run.CONFIG
    machine = json.loads(path.read_text()).get("machine") if path.is_file() else None
    return _short_machine(machine) if machine else "unknown"


def _seeds_by_machine(runs: pd.DataFrame) -> str:
    """"Xeon 6/167 (seeds 1-4), EPYC 26/2 (seed 5)": which seeds ran on which CPU type."""
    parts = []
    for cpu, part in runs.groupby("cpu", sort=True):
        seeds = sorted({int(s) for s in part["seed"]})
        parts.append(f"{cpu} (seed{'s' * (len(seeds) > 1)} {_span(seeds)})")
    return ", ".join(parts)


def _span(values: list[int]) -> str:
    """[1, 2, 3, 5] -> "1–3, 5"."""
    groups: list[list[int]] = []
    for v in values:
        if groups and v == groups[-1][-1] + 1:
            groups[-1].append(v)
        else:
            groups.append([v])
    return ", ".join(f"{g[0]}–{g[-1]}" if len(g) > 2 else ", ".join(map(str, g)) for g in groups)


def _perplexity_tokens(name: str) -> str:
    tokens = {json.loads(p.read_text())["student"]["perplexity"].get("tokens_scored")
              for r in ROOTS[name][0] for p in sorted((OUTPUTS / r).glob("*/eval.json"))}
    return ", ".join(f"{t:,}" for t in sorted(t for t in tokens if t))


def _studies_in_outputs(prefix: str) -> list[str]:
    """Studies under ``outputs/`` named ``prefix*`` with at least one evaluated run (a README or a run still
    training is not a result)."""
    return sorted(p.name for p in OUTPUTS.glob(f"{prefix}*") if p.is_dir() and any(p.glob(f"*/{Run.EVAL}")))


# ---------------------------------------------------------------------------- sections
def section_question() -> str:
    row_avg = comparison(PROTOCOL, "average")
    table = comparisons(PROTOCOL)
    sides = _resolved_by_side(table[table["comparison"] == "λ=1 − λ=0"])
    s = study(PROTOCOL)
    seeds = int(s.students.groupby("lmbda")["seed"].nunique().min())
    off, on = sides.get("λ=0", []), sides.get("λ=1", [])
    return (
        "## 1. The question\n\n"
        "When a quantized student shares its teacher's weights, does on-policy distillation (GKD with λ=1: the "
        "student learns from the teacher's feedback on its own samples) recover more quality than off-policy "
        "distillation (λ=0: dataset completions), and at what cost? The original study (Qwen3-4B, INT4, 10k "
        "GPU steps) found no benchmark difference and proposed that the shared weights leave little mismatch "
        "for on-policy training to fix.\n\n"
        f"**Today's answer** (SmolLM2-135M at INT4, `{PROTOCOL}`, {seeds} seeds per λ): of the "
        f"{len(table[table['comparison'] == 'λ=1 − λ=0'])} λ=1 − λ=0 differences measured, those resolved "
        f"favour off-policy on {len(off)} ({'; '.join(off) or 'none'}) and on-policy on {len(on)} "
        f"({'; '.join(on) or 'none'}); the "
        f"benchmark average is {verdict(row_avg)} ({difference(row_avg, 2)}). Each regime is closer to the "
        "teacher on the distribution it trains on; neither recovers *more* quality on the benchmarks. "
        "Whether on-policy distillation makes a better *generator* is the generation study's question "
        "(section 10).\n")


def section_setup() -> str:
    rows = {}
    for name in (PROTOCOL, LONG, GEMMA, LADDER):
        s = study(name)
        train = s.config["train"]
        st = s.students
        fid = s.pef[s.pef["role"] == "student"].groupby("run")["id"].nunique()
        docs = s.pe[s.pe["role"] == "student"].groupby("run").size()
        teacher = s.w.loc[s.w["role"] == "teacher", "run"].map(analysis.results_label).iloc[0]
        rows[f"`{name}`"] = {
            "model": train["model_name"], "teacher": teacher,
            "student bits": ", ".join(sorted(st["quant_type"].unique(), key=analysis.RUNG_ORDER.index))
            + f" g{int(s.config['resolved']['group_size'])}",
            "λ": ", ".join(format_value(v) for v in sorted(st["lmbda"].unique())),
            "seeds per λ": "–".join(map(str, sorted({int(n) for n in st.groupby(["quant_type", "lmbda"])["seed"]
                                                      .nunique()}))),
            "steps": ", ".join(str(int(v)) for v in sorted(st["max_steps"].unique())),
            "lr": format_value(train["learning_rate"]),
            "batch × accum.": f"{train['per_device_train_batch_size']} × {train['gradient_accumulation_steps']}",
            "rollout tokens": train["max_new_tokens"],
            "held-out chats": int(fid.max()) if len(fid) else "–",
            "benchmark docs": int(docs.max()) if len(docs) else "–",
            "perplexity tokens": _perplexity_tokens(name),
            "machines": ", ".join(_short_machine(m) for m in _machines(name)),
        }
    table = pd.DataFrame(rows).T
    machines = sorted({m for name in (PROTOCOL, LONG, GEMMA, LADDER) for m in _machines(name)})
    weights = "\n".join(f"| {NAMES.get(m, m)} | {analysis.weighting(m)} |" for m in METRICS)
    return (
        "## 2. Setup\n\n"
        "Every study distils a fake-quantized (QAT) student from its own teacher with TRL's GKD loss on the "
        "math/code chat mixture, then evaluates the student beside the teacher and post-training-quantized "
        "baselines: five multiple-choice benchmarks (lm-eval, `acc`), perplexity, and fidelity to the teacher "
        "on held-out chats (forward KL and top-1 agreement on dataset completions, reverse KL on the student's "
        "own samples, the teacher's NLL of the student's greedy output). The committed studies:\n\n"
        + markdown_table(table, "study") + "\n\n"
        "The machines (from the runs' `config.json`, named by CPU family/model in the table; wall times compare "
        "only within one):\n\n"
        + "\n".join(f"- {m}" for m in machines) + "\n\n"
        "**Statistics.** A difference is *resolved* only where two 95% intervals both exclude zero: a "
        f"hierarchical bootstrap ({N_BOOT:,} bootstrap resamples, seed {BOOT_SEED}: each resample draws the seeds of "
        "each condition and the documents or chats, the same ones for both) and a seed-level "
        "Welch–Satterthwaite interval (each seed's mean one observation). A comparison where either side "
        "has a single run has no seed replication: no interval, never resolved. Difference cells read "
        "`delta [bootstrap] [seed-level]`, **bold** where resolved. One weighting per metric, in every "
        "table:\n\n| metric | weighting |\n|---|---|\n" + weights + "\n")


def _condition_rows(name: str, columns: tuple[str, ...], rung: str | None = None) -> pd.DataFrame:
    table = conditions(name, columns, rung)
    return pd.DataFrame({NAMES.get(c, c): [mean_sd(table, cond, c) for cond in table.index]
                         for c in columns if (c, "mean") in table}, index=table.index).T


def _difference_rows(name: str, labels: list[str], rung: str | None = None) -> pd.DataFrame:
    out = {}
    for label in labels:
        out[label] = {NAMES.get(m, m): difference(comparison(name, m, label, rung))
                      for m in METRICS if _has(name, m, label, rung)}
    return pd.DataFrame(out)


def _has(name: str, metric: str, label: str, rung: str | None = None) -> bool:
    try:
        comparison(name, metric, label, rung)
    except KeyError:
        return False
    return True


def section_main(figures: Path) -> str:
    from onpolicy_lib import plots

    table = comparisons(PROTOCOL)
    labels = list(dict.fromkeys(table["comparison"]))
    fig = plots.plot_comparisons(table, NAMES, f"{PROTOCOL}: differences between λ values")
    link = figure(fig, figures, "main_result")
    ref = analysis.reference_study()
    main = ref[ref["table"] == "main"].set_index("lmbda")[list(BENCHMARKS)].mean(axis=1)
    return (
        f"## 3. Main result: on- against off-policy (`{PROTOCOL}`)\n\n"
        "SmolLM2-135M-Instruct, its Q4_1 GGUF teacher, INT4 g64 students, 100 steps, λ ∈ {0, 0.5, 1}. "
        "Each condition (mean ± sd (seeds); teacher and PTQ once):\n\n"
        + markdown_table(_condition_rows(PROTOCOL, METRICS)) + "\n\n" + weighting_line() + "\n\n"
        "Differences (`delta [bootstrap] [seed-level]`, bold: resolved):\n\n"
        + markdown_table(_difference_rows(PROTOCOL, labels)) + "\n\n" + link + "\n\n"
        + analysis.summarize_comparisons(table[table["comparison"] == "λ=1 − λ=0"], NAMES) + "\n\n"
        f"For scale, the original study's λ=1 − λ=0 on its five-benchmark average was "
        f"{num(main.loc[1] - main.loc[0], 2, sign=True)} (λ=0.5 − λ=0: {num(main.loc[0.5] - main.loc[0], 2, True)}; "
        "one run each, published numbers, no interval).\n")


def section_learning_rate(figures: Path) -> str:
    probe = OUTPUTS / LR_PROBE
    curves = {}
    for path in sorted(probe.glob("lr-*.jsonl")):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        # The Trainer logs the held-out divergence as eval_loss during training; step 0 and the end as heldout_loss.
        curves[float(path.stem[3:])] = {r["step"]: r.get("heldout_loss", r.get("eval_loss")) for r in rows
                                        if "heldout_loss" in r or "eval_loss" in r}
    frame = pd.DataFrame(curves).T.sort_index()
    frame.index = [format_value(v) for v in frame.index]
    shown = frame.map(lambda v: num(v, 3)).rename(columns=lambda s: f"step {s}")
    best = frame[50].idxmin() if 50 in frame else "–"
    ref = analysis.reference_study()
    lr = ref[ref["table"] == "learning_rate"].set_index("learning_rate")[list(BENCHMARKS)].mean(axis=1)
    original = "; ".join(f"{format_value(k)}: {num(v, 3)}" for k, v in lr.items())
    pilot = ("the generation study's learning-rate pilot (three rates per λ) is committed in "
             "`outputs/cpu_gen_lr/` and analysed there" if _studies_in_outputs("cpu_gen_lr") else
             "the generation study's learning-rate pilot (three rates per λ) is in progress")
    return (
        "## 4. Learning rate\n\n"
        "**No committed learning-rate study yet** on the benchmark protocol: `params/sweeps/cpu_lr.yaml` "
        f"(SmolLM2, λ ∈ {{0, 1}}) has not been run to a committed result; {pilot}. What exists here is the "
        "probe that set Gemma's rate "
        f"(`outputs/{LR_PROBE}/`: λ=0, seed 1, held-out divergence on 24 chats; one run per rate, so no "
        "interval):\n\n" + markdown_table(shown, "learning rate") + "\n\n"
        f"Lowest held-out divergence at step 50: {best}, the rate every Gemma study uses. It was chosen for λ=0 "
        "only; whether λ=1 wants another rate is open. The original study's λ=0 rates (five-benchmark "
        f"average, published): {original}.\n")


def section_extended(figures: Path) -> str:
    from onpolicy_lib import plots

    long, short = study(LONG), study(PROTOCOL)
    rows = {}
    for label, s in (("100 steps (seed 1)", short), ("300 steps (seed 1)", long)):
        st = s.students[(s.students["seed"] == 1) & (s.students["lmbda"].isin([0, 1]))]
        for _, r in st.sort_values("lmbda").iterrows():
            rows[f"λ={format_value(r['lmbda'])}, {label.split(' (')[0]}"] = {
                NAMES[m]: num(r[m], 3) for m in METRICS if m in r and not pd.isna(r[m])}
    table = pd.DataFrame(rows)
    diffs = comparisons(LONG)
    curves = analysis.heldout_curves(OUTPUTS / LONG)
    fig = plots.plot_heldout_curves(curves, f"{LONG}: held-out divergence during training")
    link = figure(fig, figures, "extended_training")
    return (
        f"## 5. Extended training (`{LONG}`)\n\n"
        "λ=0 and λ=1 at 300 steps, one seed each, otherwise the protocol study; beside them the protocol "
        "study's seed-1 runs at 100 steps:\n\n" + markdown_table(table) + "\n\n" + weighting_line() + "\n\n"
        "With one run per λ there is no seed replication: the differences at 300 steps have no interval and "
        "none is resolved under the rule —\n\n"
        + "\n".join(f"- {analysis.describe_difference(r, NAMES.get(r['metric'], r['metric']))}"
                    for _, r in diffs.iterrows()) + "\n\n"
        + link + "\n\n" + analysis.describe_curves(curves) + " The original study's 1k-against-20k-step "
        "comparison is not in its published tables.\n")


def section_batch_rollout() -> str:
    ref = analysis.reference_study()
    parts = []
    for table, key, name in (("batch_size", "batch_size", "batch size"),
                             ("rollout_length", "max_new_tokens", "rollout tokens")):
        part = ref[ref["table"] == table].set_index(key)[list(BENCHMARKS)]
        part = part.assign(average=part.mean(axis=1)).map(lambda v: num(v, 3))
        part.index = [f"{name} {int(v)}" for v in part.index]
        parts.append(markdown_table(part.rename(columns=BENCHMARKS), name))
    return (
        "## 6. Batch size and rollout length (λ=1)\n\n"
        "**No committed study yet** on this tool: `params/sweeps/cpu_batch.yaml` and `cpu_rollout.yaml` exist "
        "but have not been run to committed results. The original study's published tables (Qwen3-4B, one "
        "run each, no interval):\n\n" + "\n\n".join(parts) + "\n")


def section_ladder(figures: Path) -> str:
    from onpolicy_lib import plots

    effects = comparisons(LADDER)
    rungs = list(dict.fromkeys(effects["quant_type"]))
    metrics = [m for m in ("average", "reverse_kl_on_policy", "teacher_nll_of_student_greedy", "forward_kl",
                           "top1_agreement", "perplexity", "heldout_loss_after") if m in set(effects["metric"])]
    rows = {}
    for rung in rungs:
        part = effects[effects["quant_type"] == rung]
        ptq = part["ptq_forward_kl"].iloc[0]
        rows[f"{rung} (RTN forward KL {num(ptq, 3)})"] = {
            NAMES[m]: difference(part[part["metric"] == m].iloc[0]) for m in metrics}
    table = pd.DataFrame(rows).T
    fig = plots.plot_ladder(effects, NAMES, f"{LADDER}: λ=1 − λ=0 by rung")
    link = figure(fig, figures, "ladder")
    rel = ", ".join(f"{r} {100 * relative(LADDER, 'forward_kl', r):+.0f}%" for r in rungs)
    rkl = " → ".join(num(comparison(LADDER, "reverse_kl_on_policy", rung=r)["delta"], 3, True) for r in rungs)
    fkl = " → ".join(num(comparison(LADDER, "forward_kl", rung=r)["delta"], 3, True) for r in rungs)
    bench = [comparison(LADDER, "average", rung=r) for r in rungs]
    int8 = conditions(LADDER, ("forward_kl", "perplexity"), "int8")
    int8_text = "; ".join(f"{c} forward KL {mean_sd(int8, c, 'forward_kl')}, perplexity "
                          f"{mean_sd(int8, c, 'perplexity', 4)}" for c in int8.index)
    return (
        f"## 7. The quantization ladder (`{LADDER}`, Gemma-3-270m)\n\n"
        "If the mismatch between student and teacher is what on-policy training fixes, its advantage should "
        "grow as the student is pushed further from the teacher. λ=1 − λ=0 per rung (the int4 rung is "
        f"`{GEMMA}`'s runs), against the distance of each rung's round-to-nearest model from the teacher (its "
        "per-chat mean forward KL):\n\n" + markdown_table(table, "rung") + "\n\n"
        + weighting_line(tuple(metrics)) + " Negative KL, NLL, perplexity and divergence and positive "
        "agreement and accuracy favour λ=1.\n\n" + link + "\n\n"
        f"- Reverse KL on the student's own samples (where λ=1 trains): {rkl}; "
        + "; ".join(f"{r} {verdict(comparison(LADDER, 'reverse_kl_on_policy', rung=r))}" for r in rungs) + ".\n"
        f"- Forward KL on dataset completions (where λ=0 trains): {fkl}; relative to λ=0's own per-chat mean: "
        f"{rel}; " + "; ".join(f"{r} {verdict(comparison(LADDER, 'forward_kl', rung=r))}" for r in rungs) + ".\n"
        "- Benchmark average: " + "; ".join(f"{r} {difference(b)} ({verdict(b)})" for r, b in zip(rungs, bench,
                                                                                               strict=True)) + ".\n"
        f"- Int8 has no students (every baseline already sits on the teacher): {int8_text}.\n")


def section_gemma() -> str:
    labels = {"Gemma-3-270m (int4 rung)": (LADDER, "int4"), "SmolLM2-135M": (PROTOCOL, None)}
    rows = {}
    for title, (name, rung) in labels.items():
        rows[title] = {NAMES[m]: difference(comparison(name, m, rung=rung)) for m in METRICS
                       if _has(name, m, "λ=1 − λ=0", rung)}
    table = pd.DataFrame(rows)
    ppl = comparison(LADDER, "perplexity", rung="int4")
    seeds = study(LADDER).students.query("quant_type == 'int4'").pivot_table(index="seed", columns="lmbda",
                                                                             values="perplexity")
    pairs = "; ".join(f"seed {int(s)}: λ=1 {num(r[1.0], 4)} against λ=0 {num(r[0.0], 4)}" for s, r in seeds.iterrows())
    same = sum(np.sign(a - b) == np.sign(ppl["delta"]) for a in seeds[1.0] for b in seeds[0.0])
    return (
        "## 8. A second architecture: Gemma-3-270m\n\n"
        f"`{GEMMA}` repeats the key comparison on Gemma-3-270m (a base model, teacher a Q4_K_M GGUF whose body "
        "lies on no INT4 grid), two seeds per λ; it is also the ladder's int4 rung, and this table reads the "
        "same computation as the ladder's int4 row. λ=1 − λ=0 on both models:\n\n"
        + markdown_table(table) + "\n\n" + weighting_line() + "\n\n"
        f"Perplexity on Gemma: {difference(ppl)}, {verdict(ppl)}; per seed {pairs} ({same} of "
        f"{seeds[1.0].count() * seeds[0.0].count()} pairings of a λ=1 seed with a λ=0 seed point the same way).\n")


def section_baselines(figures: Path) -> str:
    from onpolicy_lib import plots

    columns = ("forward_kl", "top1_agreement", "reverse_kl_on_policy", "teacher_nll_of_student_greedy",
               "perplexity", "average")
    w = study(LADDER).w
    table = analysis.ladder_table(w, list(columns))
    fig = plots.plot_conditions(table, NAMES, f"{LADDER}: every model of each rung")
    link = figure(fig, figures, "baselines")
    parts, sentences = [], []
    for rung in dict.fromkeys(table.index.get_level_values(0)):
        part = conditions(LADDER, columns, rung)
        shown = pd.DataFrame({NAMES[c]: [mean_sd(part, cond, c) for cond in part.index] for c in columns},
                             index=part.index)
        parts.append(f"**{rung}**\n\n" + markdown_table(shown, "model"))
        gptq = [c for c in part.index if c.startswith("GPTQ")]
        students = [c for c in part.index if c.startswith("λ=")]
        if gptq and students:
            g = part.loc[gptq[0], ("forward_kl", "mean")]
            s = part.loc[students, ("forward_kl", "mean")]
            place = "below both students'" if g < s.min() else "above both students'" if g > s.max() else \
                "between the students'"
            sentences.append(f"{rung}: GPTQ's forward KL {num(g, 3)} is {place} ("
                             + ", ".join(f"{c} {num(v, 3)}" for c, v in s.items()) + ")")
    repeats = w[(w["role"] != "student") & w["run"].str.contains(r"\(evaluation \d+\)", regex=True)]
    repeated = sorted({analysis.results_label(r) for r in repeats["run"]})
    return (
        "## 9. Against post-training quantization (RTN, GPTQ, AWQ)\n\n"
        "Each rung's round-to-nearest (PTQ), GPTQ and AWQ models on the students' grid (symmetric g64, "
        "16 calibration chats), beside the teacher and the students (mean ± sd (n); n counts seeds for "
        "students and evaluations for baselines):\n\n" + "\n\n".join(parts) + "\n\n"
        + weighting_line(columns) + "\n\n" + link + "\n\n"
        + ("Evaluated twice (on two machines; the second calibration differs, so both are kept and "
           f"averaged): {', '.join(repeated)}.\n\n" if repeated else "")
        + "Students against GPTQ (a baseline is not seed-replicated, so these are not resolved): "
        + "; ".join(sentences) + ".\n")


GEN_PILOT = "cpu_gen_lr"
GEN_PILOT_EDGE = "cpu_gen_lr_edge"
GEN_COLUMNS = ("gen_greedy/rouge_l", "gen_greedy/teacher_nll", "gen_greedy/correct", "gen_greedy/tokens",
               "gen_greedy/hit_cap")


def _generation_evaluated(root: Path) -> pd.DataFrame:
    """The wide rows (students and baselines) of ``root``'s runs with greedy generation figures."""
    w = results.wide(results.collect([root]))
    present = [c for c in GEN_COLUMNS if c in w]
    return w[w[present].notna().any(axis=1)] if present else w[:0]


def _generation_pilot() -> str:
    """The learning-rate pilot: each run's greedy quality beside the teacher and PTQ, the rate chosen per λ,
    and what each metric can resolve at the pilot's prompts."""
    root = OUTPUTS / GEN_PILOT
    evaluated = _generation_evaluated(root)
    students = evaluated[evaluated["role"] == "student"]
    columns = [c for c in GEN_COLUMNS if c in evaluated]
    names = {c: analysis.GENERATION_NAMES[c].replace(", greedy outputs", "") for c in columns}
    frame = analysis.generation_frame([root])
    # The grid's extension below its lowest rate, run after the study began: its students join the table and
    # a second reading of the rule, never the tolerance or the power figures (those stay the pilot's own).
    edge_root = OUTPUTS / GEN_PILOT_EDGE
    edge = pd.DataFrame()
    if any(edge_root.glob(f"*/{Run.EVAL}")):
        edge = _generation_evaluated(edge_root)
        edge = edge[edge["role"] == "student"]
        edge_frame = analysis.generation_frame([edge_root])
        frame_with_edge = pd.concat([frame, edge_frame[edge_frame["role"] == "student"]], ignore_index=True)
    else:
        frame_with_edge = frame
    # Repetition is computed from the outputs' text (results.per_example_generation), per prompt.
    repetition_metric = "gen_greedy/repetition"
    levels = analysis.generation_references(frame, [repetition_metric]) if not frame.empty else {}
    per_run = (analysis.generation_runs(frame_with_edge, ["lmbda", "learning_rate"]).set_index("run")
               if not frame.empty else pd.DataFrame())
    rows = {}
    for role in ("teacher", "ptq"):
        part = evaluated[evaluated["role"] == role]
        if not part.empty:
            rep = levels.get(analysis.REFERENCE_NAMES[role], {}).get(repetition_metric)
            rows[role if role == "teacher" else "RTN PTQ"] = [*(num(part[c].mean(), 3) for c in columns), num(rep, 2)]
    shown = pd.concat([students.assign(edge=False), edge.assign(edge=True)], ignore_index=True)
    for _, run in shown.sort_values(["lmbda", "learning_rate"]).iterrows():
        rep = per_run[repetition_metric].get(run["run"]) if repetition_metric in per_run else None
        mark = " (added later)" if run["edge"] else ""
        rows[f"student λ={num(run['lmbda'], 0)}, lr {run['learning_rate']:g}{mark}"] = [
            *(num(run[c] if c in run else None, 3) for c in columns), num(rep, 2)]
    repetition = analysis.GENERATION_NAMES[repetition_metric].replace(", greedy outputs", "")
    table = pd.DataFrame.from_dict(rows, orient="index", columns=[*(names[c] for c in columns), repetition])
    runs = sorted(p.name for p in root.glob(f"*/{Run.EVAL}"))
    tolerance = analysis.rate_tolerance(frame)
    choice = analysis.rate_choice(students, tolerance=tolerance)
    plain = analysis.rate_choice(students)

    def rates(table: pd.DataFrame) -> str:
        return "; ".join(f"λ={num(r['lmbda'], 0)}: {r['learning_rate']:g}"
                         for _, r in table[table["chosen"]].iterrows()) if not table.empty else "none yet"

    chosen = rates(choice)
    differs = (f" Without the tie rule, ROUGE-L alone would choose {rates(plain)}."
               if not plain.empty and rates(plain) != chosen else "")
    complete = not choice.empty and bool((choice.groupby("lmbda").size() >= 3).all())
    edge_text = ""
    if not edge.empty:
        with_edge = rates(analysis.rate_choice(pd.concat([students, edge], ignore_index=True), tolerance=tolerance))
        planned = _planned_runs(edge_root)
        edge_text = (
            f"\n\n**The grid extended below its lowest rate** (`outputs/{GEN_PILOT_EDGE}/`, "
            f"{len(edge)} of its {planned} runs evaluated; rate "
            f"{', '.join(f'{r:g}' for r in sorted(edge['learning_rate'].unique()))}, the pilot's settings, seed and "
            "prompts; run after the study began, so it checks the study's rate rather than choosing it, and the "
            "tie tolerance and the power figures below stay the pilot's own). The same rule over every rate in "
            f"the table chooses {with_edge}" + (" — the rates the study uses." if with_edge == chosen else
                                                 f", not the study's {chosen}.") + " Rows marked *added later*.")
    power = analysis.generation_power(frame)
    power_rows = {analysis.GENERATION_NAMES.get(r["metric"], r["metric"]): [
        r["prompts"], num(r["teacher"], 3), num(r["ptq"], 3),
        f"{num(r['gap'], 3)} [{num(r['gap_low'], 3)}, {num(r['gap_high'], 3)}]", num(r["mde"], 3),
        num(r["mde_over_gap"], 2)] for _, r in power.iterrows()
        if r["metric"].startswith("gen_greedy/") and not r["metric"].endswith(("tokens", "hit_cap"))}
    power_table = pd.DataFrame.from_dict(power_rows, orient="index", columns=[
        "prompts", "teacher", "PTQ", "gap (teacher − PTQ) [95%]", "paired MDE, 80% power", "MDE / gap"])
    return (f"### The learning-rate pilot (`outputs/{GEN_PILOT}/`, {'complete' if complete else 'in progress'})\n\n"
            f"Evaluated runs: {len(runs)} of the pilot's six (three rates × λ ∈ {{0, 1}}, seed 1, 100 steps). "
            "Greedy outputs on the generation evaluation's *validation* prompts (never the study's test slice), "
            f"{analysis.GENERATION_WEIGHTING}; one seed per cell, so no interval. Rates chosen by greedy ROUGE-L, "
            "rates within its minimum detectable difference of the best counting as tied and the teacher's NLL "
            f"choosing among those (`analysis.rate_choice` with `analysis.rate_tolerance`): {chosen}.{differs}"
            f"{edge_text}\n\n"
            + markdown_table(table) + "\n\n"
            + ("What each metric can resolve (`analysis.generation_power`): the teacher-to-PTQ gap with its "
               "paired 95% interval over these prompts, and the smallest paired student-vs-student difference "
               "detected with 80% power at this many prompts, from the students' per-prompt differences. "
               "Prompt sampling only; seed-to-seed variation adds to it.\n\n" + markdown_table(power_table)
               + "\n" if not power_table.empty else ""))


GEN_STUDY = "cpu_gen"
BF16_TWIN = "cpu_bf16_training"
CROSS_CPU_TWIN = "cpu_gen_cross_cpu"
# The study's metrics, in reading order: the two the pilot's power table says can carry a verdict first.
GEN_STUDY_METRICS = ("gen_greedy/teacher_nll", "gen_sampled/teacher_nll", "gen_greedy/rouge_l", "gen_sampled/rouge_l",
                     "gen_greedy/correct", "gen_sampled/correct", "gen_greedy/repetition", "gen_sampled/repetition",
                     "gen_greedy/hit_cap", "gen_greedy/tokens")
GEN_COST = ("flops", "tokens_trained", "tokens_generated", "median_step_s", "wall_time_s")


def _mean_sd(mean: float, sd: float, n: int, digits: int) -> str:
    """``mean ± sd`` with the sd to the mean's decimals; the mean alone for one run."""
    if n < 2 or pd.isna(sd):
        return num(mean, digits)
    places = decimals(mean, digits)
    return f"{num(mean, digits, places=places)} ± {num(sd, digits, places=places)}"


def _arm(row: pd.Series | dict[str, Any]) -> str:
    return analysis.arm_label({"lmbda": row["lmbda"], "max_steps": row["max_steps"]})


def _planned_runs(root: Path) -> int:
    return len(read_manifest(root).get("runs", {}))


def _design_power(prompts: int) -> str:
    """What the study could detect, from the pilot, before its own runs: the paired MDE at its prompt count."""
    pilot = OUTPUTS / GEN_PILOT
    if not any(pilot.glob(f"*/{Run.EVAL}")):
        return ""
    power = analysis.generation_power(analysis.generation_frame([pilot]), planned_prompts=prompts)
    power = power[power["metric"].isin(GEN_STUDY_METRICS)]
    cells = [f"{analysis.GENERATION_NAMES.get(r['metric'], r['metric'])} {num(r['mde'], 2)} "
             f"({num(100 * r['mde_over_gap'], 2)}% of the pilot's teacher-to-PTQ gap)"
             for _, r in power.iterrows() if r["metric"].endswith(("teacher_nll", "rouge_l"))]
    return (f"Stated before the study ran, from the pilot's per-prompt differences between students "
            f"(`analysis.generation_power`): at {prompts} paired prompts a comparison detects, with 80% power at "
            f"the 5% level, {'; '.join(cells)}. That is prompt sampling only; seed-to-seed variation adds to it, "
            "which the seed-level interval below measures.\n\n")


def _generation_study(figures: Path | None = None) -> str:
    """The study: each arm's generation quality over its seeds beside the teacher and PTQ, the share of the
    teacher-to-PTQ gap each recovers, the step- and FLOP-matched λ comparisons under the rule, and the cost."""
    root = OUTPUTS / GEN_STUDY
    w = results.wide(results.collect([root]))
    peg = analysis.generation_frame([root])
    evaluated = peg["run"].unique() if not peg.empty else []
    students = w[(w["role"] == "student") & w["run"].isin(evaluated)]
    planned = _planned_runs(root)
    if students.empty:
        return ""
    prompts = int(peg[peg["role"] == "student"]["id"].nunique())
    config = json.loads(sorted(root.glob(f"*/{Run.CONFIG}"))[0].read_text())
    settings = config.get("train", {})
    # Wall times compare only within one CPU type, so each run's type travels with it.
    students = students.assign(cpu=[_run_machine(root / name) for name in students["run"]])
    machines = sorted(students["cpu"].unique())
    # Each run's per-prompt means: the weighting of every generation number here, text metrics included.
    runs = analysis.generation_runs(peg[peg["run"].isin(students["run"])], ["lmbda", "max_steps"])
    metrics = [m for m in GEN_STUDY_METRICS if m in runs]
    students = students.drop(columns=[c for c in metrics if c in students]).merge(
        runs.set_index("run")[metrics], left_on="run", right_index=True)
    names = {m: analysis.GENERATION_NAMES.get(m, m) for m in metrics}

    rows = {label: [num(means.get(m), 3) for m in metrics] + ["–"]
            for label, means in analysis.generation_references(peg, metrics).items()}
    arms = students.groupby(["lmbda", "max_steps"])
    for (lmbda, steps), part in arms:
        cells = []
        for m in metrics:
            mean, sd = part[m].mean(), part[m].std(ddof=1)
            cells.append(_mean_sd(mean, sd, len(part), 3))
        rows[f"student {_arm({'lmbda': lmbda, 'max_steps': steps})}"] = [*cells, str(len(part))]
    table = pd.DataFrame.from_dict(rows, orient="index", columns=[*names.values(), "seeds"])

    gaps = analysis.generation_gap_recovered(peg, ("lmbda", "max_steps"))
    gap_rows = {}
    for (lmbda, steps), part in (gaps.groupby(["lmbda", "max_steps"]) if not gaps.empty else []):  # no baselines
        part = part.set_index("metric")
        gap_rows[_arm({"lmbda": lmbda, "max_steps": steps})] = [
            "–" if m not in part.index else _mean_sd(part.loc[m, "mean"], part.loc[m, "std"], part.loc[m, "seeds"], 2)
            for m in metrics if m.endswith(("teacher_nll", "rouge_l"))]
    gap_table = pd.DataFrame.from_dict(gap_rows, orient="index",
                                       columns=[names[m] for m in metrics if m.endswith(("teacher_nll", "rouge_l"))])

    pairs = analysis.arm_pairs(students, ["lmbda", "max_steps"])
    compared = analysis.compare_pairs(pd.DataFrame(), peg[peg["metric"].isin(metrics)], students, pairs,
                                      n_boot=N_BOOT, seed=BOOT_SEED, run_metrics=("heldout_loss_after",))
    diff_rows = {}
    for _, r in compared.iterrows():
        diff_rows.setdefault(NAMES.get(r["metric"], names.get(r["metric"], r["metric"])), {})[r["comparison"]] = (
            difference(r))
    diff_table = pd.DataFrame.from_dict(diff_rows, orient="index")
    found = sorted(_resolved_labels(compared, names))
    # Where the two intervals disagree: what a reader would otherwise find by scanning the table's cells.
    halfway = {}
    for _, r in (compared[~compared["resolved"]].iterrows() if not compared.empty else []):
        boot = analysis.excludes_zero(r["ci_low"], r["ci_high"])
        seed = analysis.excludes_zero(r["seed_low"], r["seed_high"])
        if boot != seed:
            halfway.setdefault("bootstrap" if boot else "seed-level", {}).setdefault(r["comparison"], []).append(
                names.get(r["metric"], NAMES.get(r["metric"], r["metric"])))
    halfway_text = " ".join(f"In {c}, only the {which} interval excludes zero, for: {'; '.join(items)}."
                            for which, by_pair in halfway.items() for c, items in by_pair.items())
    one_cpu_text = _one_cpu_check(students, peg, metrics, names, compared) if not compared.empty else ""
    bounds_text = _unresolved_bounds(compared, analysis.generation_references(peg, metrics), names)

    def mean_of(part: pd.DataFrame, column: str) -> str:
        known = part[column].dropna() if column in part else pd.Series(dtype=float)
        return f"{num(known.mean(), 3)} ({len(known)})" if len(known) else "–"

    # Counts over every seed; times (mean over the runs, how many in brackets) within one CPU type each.
    counted, timed = GEN_COST[:3], GEN_COST[3:]
    cost_rows = {_arm({"lmbda": lmbda, "max_steps": steps}): [
        *(num(part[c].mean(), 3) if c in part and part[c].notna().any() else "–" for c in counted),
        *(mean_of(part[part["cpu"] == cpu], c) for cpu in machines for c in timed)] for (lmbda, steps), part in arms}
    cost_table = pd.DataFrame.from_dict(cost_rows, orient="index", columns=[
        "training FLOPs (generation included)", "tokens trained on", "tokens generated",
        *(f"{what}, {cpu}" for cpu in machines for what in ("median step (s)", "training wall time (s)"))])

    shown = ""
    if figures is not None:
        from onpolicy_lib import plots

        panel = {m: names[m] for m in ("gen_greedy/teacher_nll", "gen_greedy/rouge_l", "gen_greedy/repetition",
                                        "gen_sampled/teacher_nll") if m in metrics}
        references = analysis.generation_references(peg, list(panel))
        shown = figure(plots.plot_arms(runs, panel, references, title="generation quality by arm (points: seeds)",
                                       lower_is_better=analysis.lower_is_better),
                       figures, "generation_arms") + "\n\n"
    state = "complete" if planned and len(students) >= planned else (
        f"in progress: {len(students)} of its {planned} runs evaluated")
    intro = (f"### The study (`outputs/{GEN_STUDY}/`, {state})\n\n"
             f"`{settings.get('model_name')}` at {str(settings.get('quant_type', '')).upper()} "
             f"g{config.get('resolved', {}).get('group_size', settings.get('group_size'))}, "
             f"learning rate {settings.get('learning_rate'):g} for both λ (the pilot's choice), rollouts of up to "
             f"{settings.get('max_new_tokens')} tokens, `max_length` {settings.get('max_length')}. Each student's "
             f"greedy and sampled (temperature {settings.get('temperature'):g}) outputs on {prompts} *test* "
             f"prompts, beside the teacher and RTN PTQ; {analysis.GENERATION_WEIGHTING}; mean ± sd over seeds. "
             f"CPU: {_seeds_by_machine(students)}.\n\n")
    gaps_text = ("Share of the teacher-to-PTQ gap each arm recovers (1: the teacher; 0: no better than PTQ; mean ± "
                 "sd over seeds):\n\n" + markdown_table(gap_table) + "\n\n")
    comparisons_text = ("The λ comparisons, later arm minus earlier, step-matched (both at the same steps) and "
                        "FLOP-matched (λ=0 given the FLOPs λ=1 spent): the difference, bold where resolved, with the "
                        "hierarchical bootstrap's 95% interval over seeds and prompts, then the seed-level Welch "
                        "interval. ")
    if compared.empty:
        comparisons_text += "No pair of arms that differ in λ is evaluated yet.\n\n"
    else:
        comparisons_text += (("None is resolved." if not found else f"Resolved: {'; '.join(found)}.")
                             + (f" {halfway_text}" if halfway_text else "")
                             + "\n\n" + markdown_table(diff_table) + "\n\n" + bounds_text + one_cpu_text)
    cost_text = ("What each arm cost (FLOPs and tokens: mean over its seeds, counted from the model's shapes and "
                 "the tokens processed, so they compare across CPUs; times: mean over the runs on each CPU type, "
                 "their number in brackets, comparable only within one type; a run resumed "
                 "from a checkpoint has no wall time, its clock covering its last attempt only):\n\n"
                 + markdown_table(cost_table) + "\n" + _cost_ratios(students, machines))
    return (intro + _design_power(prompts) + markdown_table(table) + "\n\n" + shown + gaps_text + comparisons_text
            + cost_text)


def _unresolved_bounds(compared: pd.DataFrame, references: dict[str, dict[str, float]],
                       names: dict[str, str]) -> str:
    """What an unresolved comparison of the teacher's NLL still says: the span of both its intervals, also as a
    share of the teacher-to-PTQ gap, so "not resolved" reads as "no larger than this", not as "unknown"."""
    teacher, ptq = (references.get(k, {}) for k in ("teacher", "RTN PTQ"))
    parts = []
    for _, r in compared.iterrows():
        metric = r["metric"]
        if r["resolved"] or not metric.endswith("teacher_nll") or pd.isna(r["ci_low"]) or pd.isna(r["seed_low"]):
            continue
        low, high = min(r["ci_low"], r["seed_low"]), max(r["ci_high"], r["seed_high"])
        gap = ptq.get(metric, float("nan")) - teacher.get(metric, float("nan"))
        share = (f" ({num(100 * low / gap, 2, sign=True)}% to {num(100 * high / gap, 2, sign=True)}% of the "
                 "teacher-to-PTQ gap)") if gap and not pd.isna(gap) else ""
        parts.append(f"{names.get(metric, metric)}, {r['comparison']}: within [{num(low, 2, sign=True)}, "
                     f"{num(high, 2, sign=True)}]{share}")
    if not parts:
        return ""
    return ("Where the teacher's NLL is not resolved, both intervals together bound the difference (negative: λ=1's "
            "outputs likelier under the teacher): " + "; ".join(parts) + ".\n\n")


def _cost_ratios(students: pd.DataFrame, machines: list[str]) -> str:
    """λ=1 against each λ=0 arm: FLOPs over all seeds, and training time as median step × steps (wall times
    carry pauses) within each CPU type that holds both arms."""
    def time(part: pd.DataFrame, cpu: str) -> float:
        here = part[part["cpu"] == cpu]
        return (here["median_step_s"] * here["max_steps"]).mean() if "median_step_s" in here else float("nan")

    sentences = []
    for (lmbda, steps), on in students[students["lmbda"] == 1].groupby(["lmbda", "max_steps"]):
        for (_, off_steps), off in students[students["lmbda"] == 0].groupby(["lmbda", "max_steps"]):
            ratios = {cpu: time(on, cpu) / time(off, cpu) for cpu in machines}
            times = [f"{num(ratio, 2)}× on {cpu}" for cpu, ratio in ratios.items() if not pd.isna(ratio)]
            sentences.append(
                f"{_arm({'lmbda': lmbda, 'max_steps': steps})} spent {num(on['flops'].mean() / off['flops'].mean(), 3)}"
                f"× the FLOPs of {_arm({'lmbda': 0, 'max_steps': off_steps})}"
                + (f" and took {' and '.join(times)} its training time (median step × steps)" if times else "") + ".")
    return ("\n" + " ".join(sentences) + "\n") if sentences else ""


def _resolved_labels(compared: pd.DataFrame, names: dict[str, str]) -> set[str]:
    """"metric (comparison)" for each resolved row of ``compared`` (:func:`analysis.compare_pairs`)."""
    if compared.empty:
        return set()
    return {f"{names.get(m, NAMES.get(m, m))} ({c})" for m, c, r in
            zip(compared["metric"], compared["comparison"], compared["resolved"], strict=True) if r}


def _one_cpu_check(students: pd.DataFrame, peg: pd.DataFrame, metrics: list[str], names: dict[str, str],
                   compared: pd.DataFrame) -> str:
    """The comparisons again without the seeds whose arms ran on different CPU types (a seed's arms share
    its data order and initialisation; the CPU type changes float rounding and the rollout form ``auto``
    picks): which resolved differences hold, and which change. Empty when every seed ran on one type."""
    mixed = sorted(int(seed) for seed, part in students.groupby("seed") if part["cpu"].nunique() > 1)
    if not mixed:
        return ""
    kept = students[~students["seed"].isin(mixed)]
    again = analysis.compare_pairs(pd.DataFrame(), peg[peg["metric"].isin(metrics) & peg["run"].isin(kept["run"])],
                                   kept, analysis.arm_pairs(kept, ["lmbda", "max_steps"]), n_boot=N_BOOT,
                                   seed=BOOT_SEED, run_metrics=("heldout_loss_after",))

    before, after = _resolved_labels(compared, names), _resolved_labels(again, names)
    crossed = "; ".join(f"seed {seed}: " + ", ".join(f"{_arm(row)} on {row['cpu']}" for _, row in
                                                     students[students["seed"] == seed].iterrows())
                        for seed in mixed)
    seeds = _span(sorted({int(s) for s in kept["seed"]}))
    lost, gained = sorted(before - after), sorted(after - before)
    without = "them" if len(mixed) > 1 else "it"
    changes = ((f" No longer resolved: {'; '.join(lost)}." if lost else "")
               + (f" Resolved only without {without}: {'; '.join(gained)}." if gained else ""))
    return (f"Without the seeds whose arms ran on different CPU types ({crossed}), on seeds {seeds} only: "
            + ("every difference resolved above stays resolved, and no other is.\n\n" if not changes
               else f"{len(before & after)} of the {len(before)} resolved differences stay resolved.{changes}\n\n"))


def _twin_table(twin_sweep: str, columns: tuple[str, str, str]
                ) -> tuple[pd.DataFrame, pd.Series, pd.Series, int] | None:
    """One study run trained again with one thing changed (``twin_sweep``'s single run), against the study's run
    of the same seed, λ and steps, evaluated the same way: per metric the two values, their difference, the
    seed-to-seed sd of the study's arm and the difference in units of it. ``columns``: the study run's, the
    twin's and their difference's headers. Returns the table, the twin's and the study run's rows and the
    prompts compared; None until both are evaluated."""
    twin_root, study_root = OUTPUTS / twin_sweep, OUTPUTS / GEN_STUDY
    if not any(twin_root.glob(f"*/{Run.EVAL}")):
        return None
    frame = analysis.generation_frame([study_root, twin_root])
    students = results.wide(results.collect([study_root, twin_root]))
    students = students[(students["role"] == "student") & students["run"].isin(frame["run"].unique())]
    twin = students[students["sweep"] == twin_sweep].iloc[0]
    arm = students[(students["sweep"] == GEN_STUDY) & (students["lmbda"] == twin["lmbda"])
                   & (students["max_steps"] == twin["max_steps"])]
    match = arm[arm["seed"] == twin["seed"]]
    if match.empty:
        return None
    base = match.iloc[0]
    metrics = [m for m in GEN_STUDY_METRICS if m in set(frame["metric"])]
    paired = analysis.paired_run_difference(frame, base["run"], twin["run"], metrics).set_index("metric")
    spread = analysis.generation_runs(frame[frame["run"].isin(arm["run"]) & (frame["sweep"] == GEN_STUDY)],
                                      ["lmbda", "max_steps"])

    def cells(a: float, b: float, sd: float) -> list[str]:
        """The study run, the twin, their difference, the arm's seed sd, and the difference in units of it."""
        known = not pd.isna(sd)
        return [num(a, 3), num(b, 3), num(b - a, 2, sign=True), num(sd, 2) if known else "–",
                num(abs(b - a) / sd, 2) if known and sd else "–"]

    rows = {analysis.GENERATION_NAMES.get(metric, metric): cells(
                paired.loc[metric, "a"], paired.loc[metric, "b"],
                spread[metric].std(ddof=1) if len(spread) > 1 else float("nan"))
            for metric in paired.index}
    for metric, label in (("heldout_loss_after", "held-out divergence after training (per token)"),
                          ("median_step_s", "median step (s)")):
        if metric not in arm or pd.isna(base.get(metric)) or pd.isna(twin.get(metric)):
            continue
        # The seed sd is a scale for outcomes; a step's time is not one (it moves with the machine's load).
        values = arm[metric].dropna()
        sd = values.std(ddof=1) if len(values) > 1 and metric == "heldout_loss_after" else float("nan")
        rows[label] = cells(base[metric], twin[metric], sd)
    n = len(spread)
    table = pd.DataFrame.from_dict(rows, orient="index", columns=[
        *columns, f"seed sd of the study's arm ({n} seed{'s' * (n != 1)})", "difference in seed sds"])
    return table, twin, base, int(paired["prompts"].max())


def _bf16_training() -> str:
    """bf16 autocast training's effect on the study's metrics: the bf16 twin of one study run against that run
    (the same seed, λ and steps, evaluated the same way in float32), read against the seed-to-seed spread of
    the study's arm."""
    found = _twin_table(BF16_TWIN, ("float32 (the study's run)", "bf16 autocast", "bf16 − float32"))
    if found is None:
        return ""
    table, twin, _, prompts = found
    machines = sorted({_short_machine(m) for m in _machines(BF16_TWIN)})
    return (f"### bf16 autocast training (`outputs/{BF16_TWIN}/`)\n\n"
            f"The study's seed-{int(twin['seed'])} {_arm(twin)} run trained again with `dtype: bfloat16` (the opt-in "
            "bf16 autocast training; the same seed, data and quantizers), evaluated exactly as the study evaluates, "
            f"in float32, on the same {prompts} test prompts; metrics averaged "
            f"{analysis.GENERATION_WEIGHTING}. "
            "One run per side, so no interval: the difference is read against the seed-to-seed sd of the study's "
            f"float32 runs of that arm (a difference well inside it is not distinguishable from a change of seed). "
            f"CPU: {', '.join(machines)}.\n\n" + markdown_table(table) + "\n")


def _cross_cpu() -> str:
    """What the CPU type changes: one study run's configuration trained and evaluated on a second CPU type
    (the same seed, data order and settings; float rounding and the rollout form ``auto`` picks differ)."""
    twin_cpu = ", ".join(sorted({_short_machine(m) for m in _machines(CROSS_CPU_TWIN)}))
    found = _twin_table(CROSS_CPU_TWIN, ("the study's run", f"on {twin_cpu}", "difference"))
    if found is None:
        return ""
    table, twin, base, prompts = found
    study_cpu = _run_machine(OUTPUTS / GEN_STUDY / str(base["run"]))
    return (f"### The same run on another CPU type (`outputs/{CROSS_CPU_TWIN}/`)\n\n"
            f"The study's seed-{int(twin['seed'])} {_arm(twin)} run ({study_cpu}) and the same configuration trained "
            f"and evaluated on {twin_cpu}, on the same {prompts} test prompts; metrics averaged "
            f"{analysis.GENERATION_WEIGHTING}. One run per side, so no interval: the difference is read against "
            "the seed-to-seed sd of the study's runs of that arm. Times differ with the CPU type by design; the "
            "outcomes differ only through float rounding and the rollout form `auto` picked.\n\n"
            + markdown_table(table) + "\n")


def section_generation(figures: Path | None = None) -> str:
    found = _studies_in_outputs("cpu_gen")
    if not found:
        return ("## 10. Generation quality\n\n**In progress.** The generation study (full-length outputs, task "
                "correctness, ROUGE-L against references, the teacher's NLL of each output, on prompts no run "
                "trained on) has no committed results yet: this section fills in when `outputs/cpu_gen*` "
                "exists.\n")
    parts = ["## 10. Generation quality\n\nWhether on-policy distillation makes a better generator: full-length "
             "outputs on prompts no run trained on, scored by task correctness, ROUGE-L against the reference and "
             "the teacher's NLL per output token, beside the teacher and RTN PTQ.\n"]
    if GEN_STUDY in found:
        parts.append(_generation_study(figures))
    else:
        parts.append("The study itself (five seeds per step-matched arm at each λ's chosen rate, a FLOP-matched "
                     "λ=0 arm, the test prompts) has no evaluated run yet.\n")
    parts.extend(twin for twin in (_bf16_training(), _cross_cpu()) if twin)
    if GEN_PILOT in found:
        parts.append(_generation_pilot())
    others = [f for f in found if f not in (GEN_PILOT, GEN_PILOT_EDGE, GEN_STUDY, BF16_TWIN, CROSS_CPU_TWIN)]
    if others:
        parts.append("Other generation studies: " + ", ".join(f"`{f}`" for f in others)
                     + "; their analyses are in their own directories.\n")
    return "\n".join(parts)


def section_cost() -> str:
    lines = []
    for name in (PROTOCOL, GEMMA, LADDER):
        lines.append(f"- `{name}`: {analysis.describe_cost(study(name).students)}")
    return ("## 11. Cost\n\nMeasured by the runs (wall times and median steps compare only within one machine; "
            "the studies ran on the machines listed in section 2):\n\n" + "\n".join(lines) + "\n")


def section_discussion() -> str:
    table = comparisons(PROTOCOL)
    table = table[table["comparison"] == "λ=1 − λ=0"]
    gemma = comparisons(LADDER)
    gemma = gemma[gemma["quant_type"] == "int4"]
    agree = []
    for metric in METRICS:
        a, b = table[table["metric"] == metric], gemma[gemma["metric"] == metric]
        if len(a) and len(b) and np.sign(a["delta"].iloc[0]) == np.sign(b["delta"].iloc[0]):
            agree.append(NAMES[metric])
    rungs = list(dict.fromkeys(comparisons(LADDER)["quant_type"]))

    def by_rung(metric: str) -> str:
        return "; ".join(f"{r} {num(comparison(LADDER, metric, rung=r)['delta'], 3, True)}, "
                         f"{verdict(comparison(LADDER, metric, rung=r))}" for r in rungs)

    return (
        "## 12. Discussion\n\n"
        "On these models and budgets, each regime is closest to the teacher on the distribution it trains on: "
        "off-policy on reference text, on-policy on what the student itself generates. The two models agree in "
        f"the sign of λ=1 − λ=0 on {len(agree)} of {len(METRICS)} metrics ({'; '.join(agree)}). Down the ladder "
        f"the difference on the student's own samples (reverse KL) reads {by_rung('reverse_kl_on_policy')}; on "
        f"dataset completions (forward KL) {by_rung('forward_kl')}; on the benchmark average "
        f"{by_rung('average')}. Moving the student away from the teacher thus widens each regime's lead on its "
        "own distribution where the rule resolves it, without a benchmark advantage these samples can resolve: "
        "the original study's explanation (little mismatch to fix) is not supported in its strong form, nor is "
        "its opposite. With two or three seeds per arm the seed-level interval limits most claims.\n\n"
        "Caveats: small models (135M, 270M) whose benchmarks sit near chance; 100-step budgets that are not "
        "converged (section 5); teachers that are themselves GGUF-quantized; rollouts of 32 tokens, shorter "
        "than most answers; learning rates chosen for λ=0. The generation study addresses the last two.\n")


def section_reproduce() -> str:
    return ("## Reproducing this report\n\n`python -m onpolicy_lib.report` executes `notebooks/report.ipynb` "
            "over the committed `outputs/` and rewrites `REPORT.md`, `report/REPORT.html` and "
            f"`report/figures/`; every bootstrap uses {N_BOOT:,} resamples and seed {BOOT_SEED}. "
            "`tests/test_report.py` re-renders it and fails if the committed report differs.\n")


def figure(fig: Any, figures: Path, name: str) -> str:
    """Save a figure (PNG only: the report's) and return its markdown link, relative to report/."""
    import matplotlib.pyplot as plt

    figures = Path(figures)
    figures.mkdir(parents=True, exist_ok=True)
    fig.savefig(figures / f"{name}.png", dpi=110, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    return f"![{name.replace('_', ' ')}](figures/{name}.png)"


# ---------------------------------------------------------------------------- rendering
def notebook_markdown(path: Path) -> str:
    """The report as markdown: the notebook's markdown cells and the markdown its code cells display."""
    import nbformat

    nb = nbformat.read(path, as_version=4)
    parts = []
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            parts.append(cell.source.strip())
        for output in cell.get("outputs", []):
            if output.get("output_type") == "error":
                raise RuntimeError(f"report notebook failed: {output.get('ename')}: {output.get('evalue')}")
            text = output.get("data", {}).get("text/markdown")
            if text:
                parts.append(text.strip())
    return "\n\n".join(parts) + "\n"


def strip_volatile(path: Path) -> None:
    """No execution times, kernel versions, papermill timestamps or random cell ids in the executed notebook."""
    import nbformat

    nb = nbformat.read(path, as_version=4)
    nb.metadata = {"kernelspec": nb.metadata.get("kernelspec", {}), "language_info": {"name": "python"}}
    for i, cell in enumerate(nb.cells):
        cell.id = f"cell-{i:02d}"  # papermill gives its injected-parameters cell a random id
        cell.metadata = {k: v for k, v in cell.metadata.items() if k == "tags"}
        if cell.cell_type == "code":
            cell.execution_count = None
            for output in cell.get("outputs", []):
                output.pop("execution_count", None)
                output.get("metadata", {}).clear() if isinstance(output.get("metadata"), dict) else None
    nbformat.write(nb, path)


def render(out_dir: Path = PROJECT_ROOT) -> Path:
    """Execute the report notebook; write ``REPORT.md`` into ``out_dir`` and ``report/`` (HTML, figures)
    beside it. Returns the markdown's path."""
    import papermill as pm
    from nbconvert import HTMLExporter

    out_dir = Path(out_dir)
    report_dir = out_dir / "report"
    figures = report_dir / "figures"
    for old in figures.glob("*.png") if figures.is_dir() else []:
        old.unlink()  # a figure the report no longer makes must not linger
    with tempfile.TemporaryDirectory() as tmp:
        executed = Path(tmp) / "report.ipynb"
        pm.execute_notebook(str(NOTEBOOK), str(executed), cwd=str(PROJECT_ROOT), progress_bar=False,
                            parameters={"figures_dir": str(figures)})
        strip_volatile(executed)
        text = notebook_markdown(executed)
        html, _ = HTMLExporter(exclude_input=True, exclude_input_prompt=True, exclude_output_prompt=True) \
            .from_filename(str(executed))
    report_dir.mkdir(parents=True, exist_ok=True)
    (report_dir / "REPORT.html").write_text(html)
    md = out_dir / "REPORT.md"
    md.write_text(text.replace("](figures/", "](report/figures/"))
    return md


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m onpolicy_lib.report", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(PROJECT_ROOT), help="where REPORT.md and report/ go (default: the "
                        "project root)")
    args = parser.parse_args(argv)
    print(f"report written to {render(Path(args.out))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
