"""Evaluate trained students beside the teacher and the plain PTQ baseline.

For each run directory: the student *as a user would deploy it* (converted
quantized weights; a LoRA adapter merged and re-quantized, and also the
unmerged adapter-on-quantized-base form that matches training), scored on the
lm-eval benchmarks, sliding-window perplexity and the distillation-fidelity
metrics. Results go to ``<run_dir>/eval.json``. The teacher and the PTQ
baseline do not depend on the run, so their results are cached under
``outputs/eval_cache/`` keyed by everything that determines them, and a sweep
evaluates each once.
"""

from __future__ import annotations

import copy
import fcntl
import hashlib
import json
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from onpolicy_lib import benchmarks, calibrated_ptq, data, quantization
from onpolicy_lib.config import PROJECT_ROOT, ConfigError, EvalConfig, TrainConfig, portable_path, resolve_path
from onpolicy_lib.fidelity import FidelityConfig, measure_fidelity
from onpolicy_lib.models import (
    load_model,
    load_skeleton,
    load_tokenizer,
    resolve_device,
    resolve_dtype,
    teacher_precision,
)
from onpolicy_lib.perplexity import load_text, sliding_window_perplexity
from onpolicy_lib.results import model_metrics, ptq_label, teacher_label
from onpolicy_lib.rundir import Run, eval_cache_dir, read_json, write_json
from onpolicy_lib.student import load_student

# How benchmarks and perplexity compute their scores, in the baselines' cache key: results computed
# another way differ in the last float digits (and, on a near-tie, a benchmark answer), so a student
# is never set beside a baseline scored differently. 2: logits at the scored positions only.
SCORING = 2


def plan_evaluation(cfg: EvalConfig) -> list[Run]:
    """Validate ``cfg`` and its run directories (each has a student in the scheme asked for); no heavy work."""
    cfg.validate()
    runs = [Run(resolve_path(r)) for r in cfg.run_dirs]
    for run in runs:
        try:
            scheme = run.student_scheme()
        except FileNotFoundError as err:
            raise ConfigError(f"run_dirs: {err}") from None
        for name in ("model_name", "quant_type", "group_size"):
            if getattr(cfg, name) is not None and getattr(cfg, name) != scheme[name]:
                raise ConfigError(f"{name}={getattr(cfg, name)!r} does not match the student in "
                                  f"{portable_path(run.path)} ({scheme[name]!r}); the PTQ baseline must use "
                                  "the student's scheme")
    return runs


# ---------------------------------------------------------------------------- one model
def evaluate_model(model: torch.nn.Module, tokenizer, cfg: EvalConfig, teacher: torch.nn.Module | None = None,
                   fidelity: Fidelity | None = None, device: torch.device | str = "cpu",
                   parts: tuple[str, ...] = ("benchmarks", "perplexity", "fidelity")) -> dict[str, Any]:
    """Benchmarks, perplexity and (given a teacher and a held-out set) fidelity of one model."""
    out: dict[str, Any] = {}
    start = time.perf_counter()
    if cfg.tasks and "benchmarks" in parts:
        out["benchmarks"] = benchmarks.evaluate_benchmarks(
            model, tokenizer, cfg.tasks, limit=cfg.limit, mmlu_limit=cfg.mmlu_limit, batch_size=cfg.batch_size,
            num_fewshot=cfg.num_fewshot, offline=cfg.offline, device=str(device), task_limits=cfg.task_limits,
            sample_seed=cfg.sample_seed)
    if cfg.perplexity_tokens and "perplexity" in parts:
        text = load_text(cfg.perplexity_source)
        out["perplexity"] = {"source": cfg.perplexity_source, **sliding_window_perplexity(
            model, tokenizer, text, max_length=cfg.perplexity_window, stride=cfg.perplexity_window // 2,
            max_tokens=cfg.perplexity_tokens)}
    if teacher is not None and fidelity is not None and "fidelity" in parts:
        out["fidelity"] = measure_fidelity(teacher, model, tokenizer, fidelity.heldout, fidelity.config)
    out["seconds"] = round(time.perf_counter() - start, 1)
    return out


# ---------------------------------------------------------------------------- baselines, cached
def _cache_root(cfg: EvalConfig) -> Path:
    return eval_cache_dir(resolve_path(cfg.cache_dir) if cfg.cache_dir else None)


def _cache_path(cfg: EvalConfig, kind: str, key: dict[str, Any]) -> Path:
    root = _cache_root(cfg)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    name = Path(str(key["model_name"])).name
    return root / f"{kind}-{name}-{digest}.json"


def _cached(cfg: EvalConfig, kind: str, key: dict[str, Any], compute) -> dict[str, Any]:
    path = _cache_path(cfg, kind, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Runs of a parallel sweep share the cache: the first takes the lock and computes, the others
    # wait for it and read, instead of all evaluating the same baseline at once.
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path.is_file():
            print(f"{kind}: cached results from {portable_path(path)}")
            return read_json(path)
        print(f"{kind}: evaluating {key['model_name']} ...")
        result = {"key": key, **compute()}
        write_json(path, result)
        return result


@dataclass
class Fidelity:
    """A run's fidelity setting: its held-out examples and its generation settings, with a cache key."""

    heldout: Any
    config: FidelityConfig
    key: dict[str, Any]


def fidelity_for(run_cfg: dict[str, Any], samples: int, tokenizer, cache: dict[str, Any]) -> Fidelity:
    """The held-out examples a run is judged on: its dataset's held-out split, filtered as it trained
    (its max_length and completion minimum), a stratified sample over sources with a fixed seed."""
    defaults = TrainConfig()
    data_key = {"dataset_name": run_cfg["dataset_name"], "max_length": run_cfg["max_length"],
                "min_completion_tokens": run_cfg.get("min_completion_tokens", defaults.min_completion_tokens)}
    cache_key = json.dumps(data_key, sort_keys=True)
    if cache_key not in cache:  # the same prepared data the run trained and was held out on
        cache[cache_key] = data.prepare_distillation_data(data_key["dataset_name"], tokenizer, data_key["max_length"],
                                                          data_key["min_completion_tokens"]).heldout
    heldout = data.stratified_sample(cache[cache_key], samples)
    config = FidelityConfig.for_run(run_cfg, samples)
    key = {**data_key, "heldout_seed": data.HELDOUT_SEED, "heldout_ids": heldout["id"] if "id" in heldout.column_names
           else None, **vars(config)}
    return Fidelity(heldout, config, key)


def _evaluate_ptq(teacher, tokenizer, cfg: EvalConfig, device, quant_type: str, group_size: int,
                  quantize_head: bool = False, fidelity: Fidelity | None = None,
                  parts: tuple[str, ...] = ("benchmarks", "perplexity")) -> dict[str, Any]:
    # Checked where the baseline is computed (a cached one was checked when it was computed).
    quantization.check_distinct_from_teacher(teacher, quant_type, group_size, quantize_head)
    model = quantization.quantize_ptq(copy.deepcopy(teacher), quant_type, group_size, quantize_head)
    quantization.dequantize_for_eval(model, cfg.cuda_int4_kernels)  # CPU: same numbers, teacher-speed forward
    return evaluate_model(model, tokenizer, cfg, teacher, fidelity, device, parts)


def _calibration(cfg: EvalConfig, members: list, scheme_key: tuple[str, int, bool]) -> dict[str, Any]:
    """What GPTQ/AWQ calibrate on for a scheme: the training chats of its first student (or the defaults),
    sampled with ``calibration_seed``. Not with the students' training seed: each run evaluates itself,
    so that would calibrate (and cache) the baseline once per seed instead of once per scheme."""
    defaults = TrainConfig()
    run_cfg = next((c for _, c, s in members if _scheme_key(s) == scheme_key), {})
    return {k: run_cfg.get(k, getattr(defaults, k))
            for k in ("dataset_name", "max_length", "min_completion_tokens")} | {
        "seed": cfg.calibration_seed, "samples": cfg.calibration_samples}


def _evaluate_calibrated(teacher, tokenizer, cfg: EvalConfig, device, model_name: str, method: str,
                         scheme_key: tuple[str, int, bool], calibration: dict[str, Any],
                         fidelity: Fidelity | None = None,
                         parts: tuple[str, ...] = ("benchmarks", "perplexity")) -> dict[str, Any]:
    path = calibrated_ptq.calibrated_model(
        _cache_root(cfg), model_name, _recipe(method, scheme_key, device), calibration["dataset_name"],
        calibration["max_length"], calibration["min_completion_tokens"], calibration["samples"],
        calibration["seed"])
    model = calibrated_ptq.load_calibrated(path, device, teacher.dtype)
    result = evaluate_model(model, tokenizer, cfg, teacher, fidelity, device, parts)
    return {**result, "calibrated": read_json(path / "calibrated.json")}


def _recipe(method: str, scheme_key: tuple[str, int, bool], device) -> calibrated_ptq.Recipe:
    """``method``'s recipe beside students of ``scheme_key``; the students'-grid ones take its symmetry
    (symmetric on CPU, asymmetric for CUDA int4, torch's int4 kernels)."""
    quant_type, group_size, quantize_head = scheme_key
    symmetric = quantization.describe_scheme(quant_type, group_size, device, quantize_head)["mapping"] == "symmetric"
    return calibrated_ptq.recipe(method, quant_type, group_size, quantize_head, symmetric)


def _scheme_key(meta: dict[str, Any]) -> tuple[str, int, bool]:
    """A student's (quant_type, group_size, quantize_head) from its quantization.json."""
    return meta["quant_type"], meta["group_size"], bool(meta.get("quantize_head", False))


def _ptq_fidelity(cfg: EvalConfig, teacher, tokenizer, device, model_name: str, scheme_key: tuple[str, int, bool],
                  fidelity: Fidelity, kernels: dict[str, Any], dtype: torch.dtype) -> dict:
    described = quantization.describe_scheme(*scheme_key[:2], device, scheme_key[2])
    key = {"model_name": model_name, "scheme": described, **fidelity.key, **kernels, "dtype": str(dtype)}
    return _cached(cfg, "ptq-fidelity", key, partial(_evaluate_ptq, teacher, tokenizer, cfg, device, *scheme_key,
                                                     fidelity, ("fidelity",)))["fidelity"]


def _calibrated_fidelity(cfg: EvalConfig, teacher, tokenizer, device, model_name: str, method: str,
                         scheme_key: tuple[str, int, bool], baseline: dict[str, Any], fidelity: Fidelity) -> dict:
    return _cached(cfg, f"{method}-fidelity", {**baseline["key"], **fidelity.key}, partial(
        _evaluate_calibrated, teacher, tokenizer, cfg, device, model_name, method, scheme_key,
        baseline["key"]["calibration"], fidelity, ("fidelity",)))["fidelity"]


# ---------------------------------------------------------------------------- the whole evaluation
def evaluate_runs(cfg: EvalConfig) -> pd.DataFrame:
    """Evaluate every run in ``cfg.run_dirs`` (plus teacher and PTQ); write their eval.json; return the table.

    The PTQ baseline's benchmarks and perplexity are cached per scheme; its fidelity per scheme
    *and* per run setting, so each student is compared with PTQ on its own held-out examples and
    generation settings.
    """
    runs = [(run, run.train_config, run.student_scheme()) for run in plan_evaluation(cfg)]
    device = resolve_device(cfg.device)
    # Every model is loaded (teacher, students) or derived from the teacher (PTQ) in this dtype, so
    # each is quantized from weights in it and computes in it, as training computes with `dtype`.
    dtype = resolve_dtype(cfg.dtype, device)
    versions = {"lm_eval": benchmarks.lm_eval_version()}
    # Group by teacher so each teacher is loaded once.
    model_names = sorted({s["model_name"] for _, _, s in runs}) or [cfg.model_name]
    rows: list[dict[str, Any]] = []
    heldout_cache: dict[str, Any] = {}
    lone: dict[str, Any] = {}  # baselines evaluated without students, by role (for baselines_record)
    for model_name in model_names:
        members = [(r, c, s) for r, c, s in runs if s["model_name"] == model_name]
        schemes = {_scheme_key(s) for _, _, s in members} or {(cfg.quant_type, cfg.group_size, False)}
        if cfg.calibrated:  # refused from the layer shapes alone, before the teacher or any baseline
            calibrated_ptq.llmc_python()  # its environment exists
            skeleton = load_skeleton(model_name)
            for scheme_key in schemes:
                for method in cfg.calibrated:
                    calibrated_ptq.check_recipe(skeleton, model_name, method, _recipe(method, scheme_key, device))
        tokenizer = load_tokenizer(model_name)
        teacher = load_model(model_name, device=device, dtype=dtype).eval()
        precision = teacher_precision(model_name)
        bench_key = {**cfg.benchmark_settings(), **cfg.perplexity_settings(), **versions, "scoring": SCORING,
                     "dtype": str(dtype)}
        # How a quantized model runs on CUDA; CPU has one way, and its cache keys stay as they were.
        kernels = {"cuda_int4_kernels": cfg.cuda_int4_kernels} if device.type == "cuda" else {}
        teacher_result = None
        if cfg.include_teacher:
            teacher_result = _cached(cfg, "teacher", {"model_name": model_name, **bench_key},
                                     partial(evaluate_model, teacher, tokenizer, cfg, device=device))
            teacher_result = {**teacher_result, "precision": precision}
            rows.append(_row(teacher_label(teacher_result), model_name, teacher_result))
            if not members:
                lone["teacher"] = teacher_result
        # Baselines evaluated without students are judged on the held-out chats and generation
        # settings a default run of this model would be (the CPU studies change none of those).
        lone_fidelity = fidelity_for(TrainConfig(model_name=model_name).to_dict(), cfg.fidelity_samples, tokenizer,
                                     heldout_cache) if cfg.fidelity_samples and not members else None
        ptq: dict[tuple[str, int, bool], dict[str, Any]] = {}
        if cfg.include_ptq:
            for scheme_key in sorted(schemes):
                key = {"model_name": model_name, "scheme": quantization.describe_scheme(*scheme_key[:2], device,
                                                                                        scheme_key[2]), **bench_key,
                       **kernels}
                ptq[scheme_key] = _cached(cfg, "ptq", key, partial(
                    _evaluate_ptq, teacher, tokenizer, cfg, device, *scheme_key))
            if not members:
                for scheme, result in ptq.items():
                    if lone_fidelity is not None:
                        result = {**result, "fidelity": _ptq_fidelity(cfg, teacher, tokenizer, device, model_name,
                                                                      scheme, lone_fidelity, kernels, dtype)}
                    rows.append(_row(ptq_label(*scheme), model_name, result))
                    lone["ptq"] = result
        calibrated: dict[tuple[tuple[str, int, bool], str], dict[str, Any]] = {}
        for scheme_key in sorted(schemes) if cfg.calibrated else []:
            for method in cfg.calibrated:
                calibration = _calibration(cfg, members, scheme_key)
                recipe = _recipe(method, scheme_key, device)
                key = {"model_name": model_name, "method": method, "calibration": calibration,
                       "recipe": asdict(recipe), "label": recipe.label, **bench_key, **kernels}
                calibrated[scheme_key, method] = _cached(cfg, method, key, partial(
                    _evaluate_calibrated, teacher, tokenizer, cfg, device, model_name, method, scheme_key,
                    calibration))
                if not members:
                    result = calibrated[scheme_key, method]
                    if lone_fidelity is not None:
                        result = {**result, "fidelity": _calibrated_fidelity(
                            cfg, teacher, tokenizer, device, model_name, method, scheme_key, result,
                            lone_fidelity)}
                    rows.append(_row(recipe.label, model_name, result))
                    lone[method] = result
        for run, run_cfg, scheme in members:
            fidelity = fidelity_for(run_cfg, cfg.fidelity_samples, tokenizer, heldout_cache) \
                if cfg.fidelity_samples else None
            record: dict[str, Any] = {"config": cfg.to_dict(), "versions": versions, "scheme": scheme}
            # The baselines this student is compared with travel in its eval.json, so a run
            # directory (or a committed study without the cache) is self-contained for analysis.
            record["baselines"] = {}
            if teacher_result is not None:
                record["baselines"]["teacher"] = teacher_result
            scheme_key = _scheme_key(scheme)
            if scheme_key in ptq:
                baseline = dict(ptq[scheme_key])
                if fidelity is not None:
                    baseline["fidelity"] = _ptq_fidelity(cfg, teacher, tokenizer, device, model_name, scheme_key,
                                                         fidelity, kernels, dtype)
                record["baselines"]["ptq"] = baseline
                setting = f" ({run.name} setting)" if len(members) > 1 else ""
                rows.append(_row(ptq_label(*scheme_key) + setting, model_name, baseline))
            for method in cfg.calibrated:
                baseline = dict(calibrated[scheme_key, method])
                if fidelity is not None:
                    baseline["fidelity"] = _calibrated_fidelity(cfg, teacher, tokenizer, device, model_name, method,
                                                                scheme_key, baseline, fidelity)
                record["baselines"][method] = baseline
                setting = f" ({run.name} setting)" if len(members) > 1 else ""
                rows.append(_row(baseline["key"]["label"] + setting, model_name, baseline))
            forms = ["merge", "adapter"] if scheme["format"] == "lora-adapter" else ["merge"]
            for form in forms:
                student = load_student(run.path, convert=True, device=str(device), dtype=dtype, lora_mode=form)
                quantization.dequantize_for_eval(student, cfg.cuda_int4_kernels)
                name = "student" if form == "merge" else "student_lora_adapter"
                record[name] = evaluate_model(student, tokenizer, cfg, teacher, fidelity, device)
                rows.append(_row(run.name + ("" if form == "merge" else " (adapter)"), model_name, record[name],
                                 run_cfg))
                del student
            run.write_evaluation(record)
    if cfg.baselines_record is not None:
        # A baselines-only rung (no students) is still part of a study: its record lets the analysis
        # tabulate it beside the rungs that have students.
        write_json(resolve_path(cfg.baselines_record), {"config": cfg.to_dict(), "versions": versions,
                                                        "baselines": lone})
    return pd.DataFrame(rows).drop_duplicates("model", keep="first") if rows else pd.DataFrame(rows)


ROW_CONFIG = ("lmbda", "beta", "learning_rate", "max_steps", "seed", "lora_r")


def _row(label: str, model_name: str, result: dict[str, Any], run_cfg: dict[str, Any] | None = None) -> dict:
    """One model's line in the evaluation table: benchmark ``acc`` (as the original study's tables; the
    rest is in eval.json) under the task's name, then perplexity and the fidelity metrics."""
    row: dict[str, Any] = {"model": label, "teacher": model_name}
    if run_cfg:
        row.update({k: run_cfg.get(k) for k in ROW_CONFIG})
    for metric, value, _ in model_metrics(result):
        task, _, kind = metric.partition("/")
        if kind == "acc":
            row[task] = value
        elif not kind and metric != "eval_seconds":
            row[metric] = value
    return row


def run_eval_notebook(run_dir: str | Path, **parameters: Any) -> Path:
    """Render ``notebooks/eval.ipynb`` for one run into the run directory (what ``do_eval`` does)."""
    import papermill as pm

    run = Run(resolve_path(run_dir))
    out = run.file(run.EVAL_NOTEBOOK)
    pm.execute_notebook(str(PROJECT_ROOT / "notebooks" / Run.EVAL_NOTEBOOK), str(out), cwd=str(PROJECT_ROOT),
                        parameters={"run_dirs": [portable_path(run.path)], **parameters}, progress_bar=False)
    return out
