"""Results collection: any ``outputs/`` tree -> tidy pandas DataFrames.

``collect(roots)`` gives one row per (run or baseline) x metric with every configuration field as
a column; ``per_example(roots)`` gives one row per evaluated benchmark document, for paired
comparisons. Both read only the files runs leave behind (through :class:`~onpolicy_lib.rundir.Run`
and the sweep manifests), so they work on partial and failed sweeps alike: a run without metrics
contributes its status and configuration, nothing is invented for it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd

from onpolicy_lib import fidelity, rollouts
from onpolicy_lib.config import CALIBRATED_METHODS, TrainConfig, portable_path, resolve_path
from onpolicy_lib.generation_eval import METRICS as GENERATION_METRICS
from onpolicy_lib.generation_eval import TEXT_METRICS, repetition
from onpolicy_lib.metrics import loss_summary
from onpolicy_lib.rundir import BASELINES_RECORD, EVAL_CACHE_DIR, MANIFEST, Run, read_json

# Every configuration field that describes what a run did (where it was kept is the run_dir column).
CONFIG_FIELDS = [f for f in TrainConfig.field_names() if f not in ("output_dir", "eval_parameters")]
BENCHMARK_METRICS = ("acc", "acc_norm")
TRAIN_METRICS = ("wall_time_s", "median_step_s", "tokens_generated", "tokens_trained", "rollout_seconds",
                 "peak_memory_mb", "batches", "batches_on_policy", "heldout_loss_before", "heldout_loss_after",
                 "flops")
ID_COLUMNS = ["sweep", "run", "role", "status", "run_dir"]


def calibrated_label(method: str, result: dict[str, Any]) -> str:
    """"GPTQ int4 g64", "AWQ W4A16_ASYM g128 (original recipe)": as its evaluation named it."""
    key = result.get("key", {})
    if "label" in key:
        return key["label"]
    scheme = key.get("scheme", {})  # evaluations from before recipes were recorded
    return f"{method.upper()} {scheme.get('quant_type')} g{scheme.get('group_size')}" + (
        " +head" if scheme.get("head") == "quantized" else "")


def baseline_grid(result: dict[str, Any]) -> dict[str, Any]:
    """The quant_type and group_size a quantized baseline's cache key records (its own, for the
    original study's recipes: int4 g128 beside every rung)."""
    key = result.get("key", {})
    if "recipe" in key:
        return {"quant_type": f"int{key['recipe']['bits']}", "group_size": key["recipe"]["group_size"]}
    scheme = key.get("scheme") or key  # older caches: flat keys
    return {"quant_type": scheme.get("quant_type"), "group_size": scheme.get("group_size")}


def ptq_label(quant_type: str | None, group_size: int | None, quantize_head: bool = False) -> str:
    return f"PTQ {quant_type} g{group_size}" + (" +head" if quantize_head else "")


def teacher_label(result: dict[str, Any]) -> str:
    """"teacher (Q4_1 GGUF)": the teacher with its effective precision, wherever it is named."""
    precision = result.get("precision", {}).get("label")
    # Evaluations from before the precision was recorded: say so rather than imply full precision.
    return f"teacher ({precision})" if precision else "teacher (precision not recorded)"


def baselines(evaluation: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """(role, label, result) of the teacher, PTQ and calibrated (gptq, awq) results an eval.json carries."""
    out = []
    for role, result in evaluation.get("baselines", {}).items():
        scheme = result.get("key", {}).get("scheme") or result.get("key", {})  # older caches: flat keys
        args = (scheme.get("quant_type"), scheme.get("group_size"), scheme.get("head") == "quantized")
        label = (teacher_label(result) if role == "teacher" else ptq_label(*args) if role == "ptq"
                 else calibrated_label(role, result))
        out.append((role, label, result))
    return out


def _roots(roots: str | Path | Iterable[str | Path]) -> list[Path]:
    if isinstance(roots, str | Path):
        roots = [roots]
    return [resolve_path(r) for r in roots]


def find_runs(roots: str | Path | Iterable[str | Path], as_sweep: str = "") -> list[tuple[str, Path, dict[str, Any]]]:
    """Every run under ``roots`` as (sweep, run_dir, train config), started or only planned by a sweep;
    with ``as_sweep``, every run counts as that sweep's (a spec's ``analysis_with``)."""
    found: dict[Path, tuple[str, Path, dict[str, Any]]] = {}
    defaults = TrainConfig().to_dict()
    for root in _roots(roots):
        for config_path in sorted(root.rglob(Run.CONFIG)):
            run_dir = config_path.parent
            if EVAL_CACHE_DIR in run_dir.parts or Run.STUDENT == run_dir.name:
                continue
            train = (read_json(config_path) or {}).get("train")
            if isinstance(train, dict):
                # A field missing from an older config.json was added later: that run ran with its
                # default (as rundir.config_diff reads it; the rollout options' exact form), not with a
                # value that varies.
                found[run_dir] = (_sweep_name(run_dir), run_dir, {**defaults, **rollouts.EXACT_SETTINGS, **train})
        for manifest_path in sorted(root.rglob(MANIFEST)):
            manifest = read_json(manifest_path) or {}
            for name, entry in manifest.get("runs", {}).items():
                run_dir = manifest_path.parent / name
                found.setdefault(run_dir, (manifest.get("name", manifest_path.parent.name), run_dir, entry["params"]))
    runs = [(as_sweep or sweep, run_dir, train) for sweep, run_dir, train in found.values()]
    return sorted(runs, key=lambda t: (t[0], str(t[1])))


def find_baseline_records(roots: str | Path | Iterable[str | Path],
                          as_sweep: str = "") -> list[tuple[str, dict[str, Any]]]:
    """Every baselines-only evaluation under ``roots`` (``sweep --baselines-only``: a rung without
    students) as (sweep, record); the record has eval.json's ``baselines``."""
    found = {}
    for root in _roots(roots):
        for path in sorted(root.rglob(BASELINES_RECORD.format(quant_type="*"))):
            record = read_json(path)
            if isinstance(record, dict) and EVAL_CACHE_DIR not in path.parts:
                found[path] = (as_sweep or _sweep_name(path), record)
    return [found[p] for p in sorted(found)]


def _sweep_name(run_dir: Path) -> str:
    manifest = read_json(run_dir.parent / MANIFEST) or {}
    return manifest.get("name", run_dir.parent.name)


GENERATION_MODES = ("greedy", "sampled")


def model_metrics(result: dict[str, Any]) -> list[tuple[str, float, float | None]]:
    """(metric, value, stderr) of one evaluated model: benchmarks, perplexity, fidelity, eval time."""
    out: list[tuple[str, float, float | None]] = []
    for task, scores in result.get("benchmarks", {}).get("tasks", {}).items():
        for metric in BENCHMARK_METRICS:
            if scores.get(metric) is not None:
                out.append((f"{task}/{metric}", scores[metric], scores.get(f"{metric}_stderr")))
    if "perplexity" in result:
        out.append(("perplexity", result["perplexity"]["perplexity"], None))
    fid = result.get("fidelity", {})
    per_chat = fid.get("per_example") or []
    for metric in fidelity.METRICS:
        # One weighting per metric: the mean over held-out chats of each chat's per-token value, as the
        # comparisons resample them (the record's aggregate weights chats by their token counts).
        values = [example[metric] for example in per_chat if example.get(metric) is not None]
        if values:
            out.append((metric, sum(values) / len(values), None))
        elif metric in fid:
            out.append((metric, fid[metric], None))
    for mode, scored in (result.get("generation") or {}).items():
        if mode not in GENERATION_MODES:
            continue
        # Per example, as generation_eval summarises (an example's mean over its samples).
        for metric, summary in (scored.get("summary") or {}).get("all", {}).items():
            if isinstance(summary, dict) and summary.get("mean") is not None:
                out.append((f"gen_{mode}/{metric}", summary["mean"], summary.get("sem")))
    if "seconds" in result:
        out.append(("eval_seconds", result["seconds"], None))
    return out


def collect(roots: str | Path | Iterable[str | Path] = "outputs", as_sweep: str = "") -> pd.DataFrame:
    """One row per (sweep, run or baseline, metric): ``value``, ``stderr`` and every config field.

    Roles: ``student`` (the deployed student), ``student_lora_adapter`` (LoRA runs, adapter on the
    quantized base), ``teacher`` and ``ptq`` (once per sweep and baseline configuration).
    ``status`` is the run's state (done, failed, running, interrupted, pending).
    """
    rows: list[dict[str, Any]] = []
    seen_baselines: set[tuple[str, str, str]] = set()
    evaluated: list[tuple[str, dict[str, Any]]] = []
    for sweep, run_dir, train in find_runs(roots, as_sweep):
        config = {k: train.get(k) for k in CONFIG_FIELDS}
        run = Run(run_dir, params=train)
        base = {"sweep": sweep, "run": run.name, "status": run.status(), "run_dir": portable_path(run_dir), **config}
        metrics = run.metrics or {}
        values = {**{k: metrics[k] for k in TRAIN_METRICS if metrics.get(k) is not None},
                  **loss_summary(metrics.get("steps", []))}
        if metrics.get("resumed_from"):
            # A resumed run's clock covers its last attempt only (its counters and FLOPs sum every
            # attempt's logs): its wall time is not the run's, so it is left out, not averaged in.
            values.pop("wall_time_s", None)
        for metric, value in values.items():
            rows.append({**base, "role": "student", "metric": metric, "value": float(value), "stderr": None})
        evaluation = run.evaluation or {}
        for role in ("student", "student_lora_adapter"):
            for metric, value, stderr in model_metrics(evaluation.get(role, {})):
                rows.append({**base, "role": role, "metric": metric, "value": value, "stderr": stderr})
        if not values and not evaluation:
            rows.append({**base, "role": "student", "metric": None, "value": None, "stderr": None})
        evaluated.append((sweep, evaluation))
    # A baselines-only rung's record holds its baselines as a run's eval.json does (its teacher too).
    for sweep, evaluation in [*evaluated, *find_baseline_records(roots, as_sweep)]:
        for role, label, result in baselines(evaluation):
            # PTQ fidelity depends on the run's setting (held-out examples, rollout length), so it is
            # part of what makes a baseline row distinct.
            identity = {"key": result.get("key"), "fidelity": result.get("fidelity", {}).get("config")}
            digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:12]
            # The same baseline evaluated again (another machine, another calibration) with other results
            # is a second evaluation: kept as "LABEL (evaluation 2)", not dropped.
            scores = [m for m in model_metrics(result) if m[0] != "eval_seconds"]  # the time is not an outcome
            outcome = hashlib.sha256(json.dumps(scores, default=str).encode()).hexdigest()[:12]
            if (sweep, digest, outcome) in seen_baselines:
                continue
            repeat = sum(seen[:2] == (sweep, digest) for seen in seen_baselines)
            seen_baselines.add((sweep, digest, outcome))
            key = result.get("key", {})
            label = f"{label} (evaluation {repeat + 1})" if repeat else label
            baseline = {"sweep": sweep, "run": label, "status": "done", "run_dir": None,
                        **{k: None for k in CONFIG_FIELDS}, "model_name": key.get("model_name"),
                        **(baseline_grid(result) if role != "teacher" else {})}
            for metric, value, stderr in model_metrics(result):
                rows.append({**baseline, "role": role, "metric": metric, "value": value, "stderr": stderr})
    columns = ID_COLUMNS + CONFIG_FIELDS + ["metric", "value", "stderr"]
    return pd.DataFrame(rows, columns=columns)


def per_example(roots: str | Path | Iterable[str | Path] = "outputs", as_sweep: str = "") -> pd.DataFrame:
    """One row per (sweep, run or baseline, task, document): ``acc`` (and ``acc_norm``) as 0/1."""
    rows: list[dict[str, Any]] = []
    seen: set[tuple[str, str]] = set()
    per_model: list[tuple[str, list]] = []
    for sweep, run_dir, train in find_runs(roots, as_sweep):
        evaluation = Run(run_dir).evaluation
        if not evaluation:
            continue
        config = {k: train.get(k) for k in CONFIG_FIELDS}
        models = [("student", run_dir.name, config, evaluation.get("student", {}))]
        for role, label, result in baselines(evaluation):
            if (sweep, label) not in seen:
                seen.add((sweep, label))
                models.append((role, label, {k: None for k in CONFIG_FIELDS}, result))
        per_model.append((sweep, models))
    for sweep, record in find_baseline_records(roots, as_sweep):
        models = [(role, label, {k: None for k in CONFIG_FIELDS}, result) for role, label, result in baselines(record)
                  if (sweep, label) not in seen]
        seen.update((sweep, label) for _, label, _, _ in models)
        per_model.append((sweep, models))
    for sweep, models in per_model:
        for role, run, cfg, result in models:
            for task, scores in result.get("benchmarks", {}).get("tasks", {}).items():
                for sample in scores.get("samples", []):
                    rows.append({"sweep": sweep, "run": run, "role": role, **cfg, "task": task,
                                 "subject": sample.get("subject"), "doc_id": sample["doc_id"],
                                 **{m: sample[m] for m in BENCHMARK_METRICS if m in sample}})
    return pd.DataFrame(rows)


def per_example_fidelity(roots: str | Path | Iterable[str | Path] = "outputs", as_sweep: str = "") -> pd.DataFrame:
    """One row per (sweep, run or PTQ baseline, fidelity metric, held-out example): ``value``, ``source``.

    PTQ baselines appear once per run, labelled by that run: each run's PTQ fidelity is on its own
    held-out examples and generation settings.
    """
    rows: list[dict[str, Any]] = []
    per_model: list[tuple[str, dict[str, Any], list]] = []
    for sweep, run_dir, train in find_runs(roots, as_sweep):
        evaluation = Run(run_dir).evaluation
        if not evaluation:
            continue
        config = {k: train.get(k) for k in CONFIG_FIELDS}
        models = [("student", run_dir.name, evaluation.get("student", {}))]
        for role in ("ptq", *CALIBRATED_METHODS):
            if role in evaluation.get("baselines", {}):
                models.append((role, run_dir.name, evaluation["baselines"][role]))
        per_model.append((sweep, config, models))
    for sweep, record in find_baseline_records(roots, as_sweep):
        for role, label, result in baselines(record):
            if role != "teacher":  # a baselines-only rung's models, on a default run's held-out chats
                config = {**{k: None for k in CONFIG_FIELDS}, **baseline_grid(result)}
                per_model.append((sweep, config, [(role, label, result)]))
    for sweep, config, models in per_model:
        for role, run, result in models:
            for example in result.get("fidelity", {}).get("per_example", []):
                for metric in fidelity.METRICS:
                    if metric in example:
                        rows.append({"sweep": sweep, "run": run, "role": role, **config, "metric": metric,
                                     "id": example["id"], "source": example.get("source"),
                                     "value": example[metric]})
    return pd.DataFrame(rows)


def per_example_generation(roots: str | Path | Iterable[str | Path] = "outputs", as_sweep: str = "",
                           mode: str = "greedy") -> pd.DataFrame:
    """One row per (sweep, run or baseline, generation metric, prompt) of ``mode``'s outputs (greedy or
    sampled): ``value`` (an example's mean over its samples: per example, as the summaries weight),
    ``source`` (the task). Baselines appear once per run, labelled by that run (their generation is
    measured at each run's temperature), the teacher among them."""
    if mode not in GENERATION_MODES:
        raise ValueError(f"mode must be one of {', '.join(GENERATION_MODES)}, got {mode!r}")
    rows: list[dict[str, Any]] = []
    for sweep, run_dir, train in find_runs(roots, as_sweep):
        evaluation = Run(run_dir).evaluation
        if not evaluation:
            continue
        config = {k: train.get(k) for k in CONFIG_FIELDS}
        models = [("student", evaluation.get("student", {})), *evaluation.get("baselines", {}).items()]
        for role, result in models:
            records = ((result or {}).get("generation") or {}).get(mode, {}).get("per_example", [])
            values: dict[tuple[str, str, str], list[float]] = {}
            for record in records:
                text = record.get("completion")
                derived = {"repetition": repetition(text)} if isinstance(text, str) else {}
                for metric in (*GENERATION_METRICS, *TEXT_METRICS):
                    value = record.get(metric, derived.get(metric))
                    if value is not None:
                        values.setdefault((record["task"], record["id"], metric), []).append(float(value))
            for (task, example, metric), found in values.items():
                rows.append({"sweep": sweep, "run": run_dir.name, "role": role, **config, "metric": metric,
                             "id": example, "source": task, "value": sum(found) / len(found)})
    return pd.DataFrame(rows)


def wide(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (sweep, run, role), one column per metric, config fields kept."""
    df = df[df["metric"].notna()]
    keys = ["sweep", "run", "role"]
    values = df.pivot_table(index=keys, columns="metric", values="value", aggfunc="first")
    meta = df.drop_duplicates(keys).set_index(keys)[["status", *CONFIG_FIELDS]]
    table = meta.join(values).reset_index()
    table.columns.name = None
    return table
