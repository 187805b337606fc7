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
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from onpolicy_lib import benchmarks, calibrated_ptq, data, gen_tasks, quantization
from onpolicy_lib.config import PROJECT_ROOT, ConfigError, EvalConfig, TrainConfig, portable_path, resolve_path
from onpolicy_lib.fidelity import FidelityConfig, measure_fidelity
from onpolicy_lib.generation_eval import evaluate_generation
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
# The generation evaluation's version in its cache key (checkers, metrics, generation loop).
GENERATION_SCORING = 1


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
PARTS = ("benchmarks", "perplexity", "fidelity", "generation")


def evaluate_model(model: torch.nn.Module, tokenizer, cfg: EvalConfig, teacher: torch.nn.Module | None = None,
                   fidelity: Fidelity | None = None, device: torch.device | str = "cpu",
                   parts: tuple[str, ...] = PARTS, generation: GenerationSetting | None = None) -> dict[str, Any]:
    """Benchmarks, perplexity, (given a teacher and a held-out set) fidelity and (given a generation
    setting) generation quality of one model."""
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
    if generation is not None and "generation" in parts:
        # The teacher scores its own outputs too: its NLL of them is the reference a student's is set against.
        out["generation"] = evaluate_generation(
            model, tokenizer, generation.items, teacher=teacher if teacher is not None else model,
            temperature=generation.temperature, **generation.arguments)
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


@dataclass
class GenerationSetting:
    """The generation evaluation a run is judged on: its prompts, its sampling temperature, a cache key."""

    items: list
    temperature: float
    arguments: dict[str, Any]  # evaluate_generation's other settings
    key: dict[str, Any]


def generation_for(cfg: EvalConfig, run_cfg: dict[str, Any], cache: dict[str, Any]) -> GenerationSetting | None:
    """``cfg``'s generation prompts (a seeded sample per task of the split's slice), sampled at the
    run's training temperature unless ``generation_temperature`` is set; None without generation tasks."""
    if not cfg.generation_tasks:
        return None
    settings = cfg.generation_settings()
    items_key = json.dumps([settings[k] for k in ("tasks", "split", "limit", "seed")])
    if items_key not in cache:
        cache[items_key] = gen_tasks.generation_items(cfg.generation_split, cfg.generation_tasks,
                                                      limit=cfg.generation_limit, seed=cfg.generation_seed)
    items = cache[items_key]
    temperature = cfg.generation_temperature or run_cfg.get("temperature", TrainConfig().temperature)
    arguments = {"max_new_tokens": cfg.generation_max_new_tokens, "samples": cfg.generation_samples,
                 "seed": cfg.generation_seed, "batch_size": cfg.generation_batch_size,
                 "matmul": cfg.generation_matmul}
    key = {**settings, "temperature": temperature, "ids": [f"{i.task}/{i.id}" for i in items],
           "scoring": GENERATION_SCORING}
    return GenerationSetting(items, temperature, arguments, key)


def _evaluate_ptq(teacher, tokenizer, cfg: EvalConfig, device, quant_type: str, group_size: int,
                  quantize_head: bool = False, fidelity: Fidelity | None = None,
                  parts: tuple[str, ...] = ("benchmarks", "perplexity"),
                  generation: GenerationSetting | None = None) -> dict[str, Any]:
    # Checked where the baseline is computed (a cached one was checked when it was computed).
    quantization.check_distinct_from_teacher(teacher, quant_type, group_size, quantize_head)
    model = quantization.quantize_ptq(copy.deepcopy(teacher), quant_type, group_size, quantize_head)
    quantization.dequantize_for_eval(model, cfg.cuda_int4_kernels)  # CPU: same numbers, teacher-speed forward
    return evaluate_model(model, tokenizer, cfg, teacher, fidelity, device, parts, generation)


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
                         parts: tuple[str, ...] = ("benchmarks", "perplexity"),
                         generation: GenerationSetting | None = None) -> dict[str, Any]:
    path = calibrated_ptq.calibrated_model(
        _cache_root(cfg), model_name, _recipe(method, scheme_key, device), calibration["dataset_name"],
        calibration["max_length"], calibration["min_completion_tokens"], calibration["samples"],
        calibration["seed"])
    model = calibrated_ptq.load_calibrated(path, device, teacher.dtype)
    result = evaluate_model(model, tokenizer, cfg, teacher, fidelity, device, parts, generation)
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


@dataclass
class Baseline:
    """A model a student is set beside: the teacher, the PTQ baseline or one calibrated method, in one scheme.

    Its benchmarks and perplexity are cached under ``key``; its fidelity (not for the teacher, the
    reference fidelity is measured against) is cached per run setting as well, since each student is
    compared on its own held-out examples and generation settings.
    """

    role: str  # its name in eval.json's baselines and in the cache: teacher, ptq or a calibrated method
    scheme: tuple[str, int, bool] | None  # the students' scheme it stands beside; None: the teacher, beside all
    key: dict[str, Any]
    evaluate: Callable[..., dict[str, Any]]  # evaluate(fidelity=..., parts=...) -> results
    fidelity_key: dict[str, Any] | None = None  # its fidelity's cache key, less the run setting; None: no fidelity
    label: str | None = None  # None: from its results (the teacher's precision)
    extra: dict[str, Any] = field(default_factory=dict)  # added to the results, not cached

    def results(self, cfg: EvalConfig) -> dict[str, Any]:
        """Benchmarks and perplexity (cached)."""
        compute = partial(self.evaluate, fidelity=None, parts=("benchmarks", "perplexity"))
        return {**_cached(cfg, self.role, self.key, compute), **self.extra}

    def with_fidelity(self, cfg: EvalConfig, results: dict[str, Any], fidelity: Fidelity | None) -> dict[str, Any]:
        """``results`` plus the fidelity metrics on ``fidelity``'s setting (cached), where it has them."""
        if fidelity is None or self.fidelity_key is None:
            return dict(results)
        measured = _cached(cfg, f"{self.role}-fidelity", {**self.fidelity_key, **fidelity.key},
                           partial(self.evaluate, fidelity=fidelity, parts=("fidelity",)))
        return {**results, "fidelity": measured["fidelity"]}

    def with_generation(self, cfg: EvalConfig, results: dict[str, Any],
                        generation: GenerationSetting | None) -> dict[str, Any]:
        """``results`` plus generation quality on ``generation``'s prompts and temperature (cached)."""
        if generation is None:
            return dict(results)
        model_key = {k: v for k, v in self.key.items() if k not in _EVALUATION_SETTINGS}
        measured = _cached(cfg, f"{self.role}-generation", {**model_key, "generation": generation.key},
                           partial(self.evaluate, fidelity=None, parts=("generation",), generation=generation))
        return {**results, "generation": measured["generation"]}

    def row_label(self, results: dict[str, Any]) -> str:
        return self.label if self.label is not None else teacher_label(results)


# Keys of a baseline's cache key that say how benchmarks and perplexity were run, not which model it is.
_EVALUATION_SETTINGS = (*EvalConfig().benchmark_settings(), *EvalConfig().perplexity_settings(), "lm_eval", "scoring")


def baselines(cfg: EvalConfig, model_name: str, teacher: torch.nn.Module, tokenizer, device: torch.device,
              dtype: torch.dtype, schemes: set[tuple[str, int, bool]], members: list) -> list[Baseline]:
    """The baselines ``cfg`` asks for beside students of ``schemes``: the teacher, then PTQ and each
    calibrated method per scheme."""
    versions = {"lm_eval": benchmarks.lm_eval_version()}
    bench_key = {**cfg.benchmark_settings(), **cfg.perplexity_settings(), **versions, "scoring": SCORING,
                 "dtype": str(dtype)}
    # How a quantized model runs on CUDA; CPU has one way, and its cache keys stay as they were.
    kernels = {"cuda_int4_kernels": cfg.cuda_int4_kernels} if device.type == "cuda" else {}
    out: list[Baseline] = []
    if cfg.include_teacher:
        out.append(Baseline("teacher", None, {"model_name": model_name, **bench_key},
                            partial(evaluate_model, teacher, tokenizer, cfg, device=device),
                            extra={"precision": teacher_precision(model_name)}))
    for scheme_key in sorted(schemes) if cfg.include_ptq else []:
        described = quantization.describe_scheme(*scheme_key[:2], device, scheme_key[2])
        out.append(Baseline("ptq", scheme_key, {"model_name": model_name, "scheme": described, **bench_key, **kernels},
                            partial(_evaluate_ptq, teacher, tokenizer, cfg, device, *scheme_key),
                            {"model_name": model_name, "scheme": described, **kernels, "dtype": str(dtype)},
                            ptq_label(*scheme_key)))
    for scheme_key in sorted(schemes) if cfg.calibrated else []:
        for method in cfg.calibrated:
            calibration = _calibration(cfg, members, scheme_key)
            recipe = _recipe(method, scheme_key, device)
            key = {"model_name": model_name, "method": method, "calibration": calibration,
                   "recipe": asdict(recipe), "label": recipe.label, **bench_key, **kernels}
            out.append(Baseline(method, scheme_key, key, partial(
                _evaluate_calibrated, teacher, tokenizer, cfg, device, model_name, method, scheme_key, calibration),
                key, recipe.label))
    return out


# ---------------------------------------------------------------------------- the whole evaluation
def evaluate_runs(cfg: EvalConfig) -> pd.DataFrame:
    """Evaluate every run in ``cfg.run_dirs`` beside its baselines; write their eval.json; return the table.

    The baselines' benchmarks and perplexity are cached per scheme; their fidelity per scheme *and*
    per run setting, so each student is compared with each baseline on its own held-out examples and
    generation settings. Without run directories the baselines alone are evaluated (and, with
    ``baselines_record``, recorded).
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
    items_cache: dict[str, Any] = {}
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
        references = baselines(cfg, model_name, teacher, tokenizer, device, dtype, schemes, members)
        results = [(baseline, baseline.results(cfg)) for baseline in references]

        if not members:
            # Judged on the held-out chats and generation settings a default run of this model would
            # be (the CPU studies change none of those).
            default_run = TrainConfig(model_name=model_name).to_dict()
            fidelity = fidelity_for(default_run, cfg.fidelity_samples, tokenizer,
                                    heldout_cache) if cfg.fidelity_samples else None
            generation = generation_for(cfg, default_run, items_cache)
            for baseline, result in results:
                result = baseline.with_generation(cfg, baseline.with_fidelity(cfg, result, fidelity), generation)
                rows.append(_row(baseline.row_label(result), model_name, result))
                lone[baseline.role] = result
        for run, run_cfg, scheme in members:
            fidelity = fidelity_for(run_cfg, cfg.fidelity_samples, tokenizer, heldout_cache) \
                if cfg.fidelity_samples else None
            generation = generation_for(cfg, run_cfg, items_cache)
            record: dict[str, Any] = {"config": cfg.to_dict(), "versions": versions, "scheme": scheme}
            # The baselines this student is compared with travel in its eval.json, so a run
            # directory (or a committed study without the cache) is self-contained for analysis.
            record["baselines"] = {}
            setting = f" ({run.name} setting)" if len(members) > 1 else ""
            for baseline, result in results:
                if baseline.scheme not in (None, _scheme_key(scheme)):
                    continue
                result = baseline.with_generation(cfg, baseline.with_fidelity(cfg, result, fidelity), generation)
                record["baselines"][baseline.role] = result
                # The teacher's row is the same for every run (the table keeps each label once).
                rows.append(_row(baseline.row_label(result) + (setting if baseline.scheme else ""), model_name,
                                 result))
            forms = ["merge", "adapter"] if scheme["format"] == "lora-adapter" else ["merge"]
            for form in forms:
                student = load_student(run.path, convert=True, device=str(device), dtype=dtype, lora_mode=form)
                quantization.dequantize_for_eval(student, cfg.cuda_int4_kernels)
                name = "student" if form == "merge" else "student_lora_adapter"
                record[name] = evaluate_model(student, tokenizer, cfg, teacher, fidelity, device,
                                              generation=generation)
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
    rest is in eval.json) under the task's name, then perplexity, the fidelity metrics and the generation
    summaries (gen_<greedy|sampled>/<metric>, per example)."""
    row: dict[str, Any] = {"model": label, "teacher": model_name}
    if run_cfg:
        row.update({k: run_cfg.get(k) for k in ROW_CONFIG})
    for metric, value, _ in model_metrics(result):
        task, _, kind = metric.partition("/")
        if kind == "acc":
            row[task] = value
        elif (not kind or task.startswith("gen_")) and metric != "eval_seconds":
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
