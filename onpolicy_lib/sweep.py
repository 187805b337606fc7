"""Sweeps: a YAML spec in ``params/sweeps/`` -> one papermill run of ``notebooks/train.ipynb`` per configuration.

A spec names a base preset, fixed overrides, a grid and/or an explicit list of configurations, and seeds::

    name: cpu-lambda              # outputs/<name>/ (default: the spec file's stem)
    include: _qwen_eval.yaml      # a spec fragment this one extends (optional; lm-eval's include:)
    base: qwen3_4b_study          # a preset in params/ (optional)
    params: {max_steps: 60}       # fixed overrides of any train.ipynb parameter (optional)
    grid: {lmbda: [0, 0.5, 1]}    # cartesian product (optional)
    runs: [{lmbda: 0, beta: 0}]   # explicit configurations, crossed with the grid (optional)
    seeds: [1, 2]                 # crossed with everything (optional; default: the base's seed)
    eval: true                    # render notebooks/eval.ipynb for each run (do_eval)
    eval_parameters: {limit: 100} # EvalConfig overrides (eval.ipynb parameters)
    analysis: true                # render notebooks/analysis.ipynb over the sweep when all runs are done
    analysis_with: [cpu_gemma]    # other sweeps whose runs its analysis reads as its own (optional)

Every run lands in ``outputs/<name>/<run>/`` (``<run>`` from the values that vary across the
sweep, e.g. ``lmbda-1_seed-2``) holding its rendered ``train.ipynb``. The whole expansion is
validated before anything runs. The runner is resumable: a finished run is never redone, a
killed one resumes from its checkpoint, a failed one keeps its partial notebook and error
and is retried only with ``--retry-failed``. Files named ``_*.yaml`` are fragments to include,
not sweeps::

    python -m onpolicy_lib.sweep params/sweeps/cpu_lambda.yaml --dry-run
    python -m onpolicy_lib.sweep params/sweeps/cpu_lambda.yaml --parallel 2
    python -m onpolicy_lib.sweep params/sweeps/cpu_lambda.yaml --status
    python -m onpolicy_lib.sweep params/sweeps/cpu_lambda.yaml --analysis-only   # over the runs done so far
    python -m onpolicy_lib.sweep params/sweeps/cpu_lambda.yaml --emit-commands   # one line per run, any scheduler
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import re
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from onpolicy_lib.config import (
    PROJECT_ROOT,
    ConfigError,
    EvalConfig,
    TrainConfig,
    load_preset,
    outputs_root,
    portable_path,
    portable_text,
    read_yaml,
    resolve_path,
    short_name,
)
from onpolicy_lib.rundir import (
    ANALYSIS_NOTEBOOK,
    BASELINES_NOTEBOOK,
    BASELINES_RECORD,
    FIGURES_DIR,
    Run,
    config_diff,
    format_diff,
    read_manifest,
    write_manifest,
)

TRAIN_NOTEBOOK = PROJECT_ROOT / "notebooks" / Run.TRAIN_NOTEBOOK
ANALYSIS_SOURCE = PROJECT_ROOT / "notebooks" / ANALYSIS_NOTEBOOK
SWEEPS_DIR = PROJECT_ROOT / "params" / "sweeps"
SPEC_KEYS = ("name", "include", "base", "params", "grid", "runs", "seeds", "eval", "eval_parameters", "analysis",
             "analysis_with")
# Set by the runner itself from the spec's eval/eval_parameters and its layout, never as run parameters.
RUNNER_PARAMETERS = ("output_dir", "do_eval", "eval_parameters")


class SweepError(ConfigError):
    """A spec that cannot be expanded; raised before any run starts."""


@dataclass
class Sweep:
    name: str
    spec_path: Path
    root: Path  # outputs/<name>
    runs: list[Run]
    eval: bool
    analysis: bool
    # Sweeps that already ran some of this one's grid points with its settings (a ladder's rung
    # another study trained): the analysis reads their runs as this sweep's, nothing reruns them.
    analysis_with: list[Sweep] = field(default_factory=list)


# ---------------------------------------------------------------------------- expansion
def find_spec(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.is_file():
        return path
    for candidate in (resolve_path(name_or_path), SWEEPS_DIR / f"{name_or_path}.yaml"):
        if candidate.is_file():
            return candidate
    available = ", ".join(sorted(p.stem for p in SWEEPS_DIR.glob("*.yaml") if not p.stem.startswith("_")))
    raise SweepError(f"sweep spec {name_or_path!r} not found; available in params/sweeps: {available}")


def expand(spec_path: str | Path, outputs: str | Path | None = None, check_models: bool = True) -> Sweep:
    """Read and validate a spec; every run's parameters and directory. Raises SweepError, nothing runs."""
    spec_path = find_spec(str(spec_path))
    where = spec_path.name
    spec = read_spec(spec_path)
    name = str(spec.get("name") or spec_path.stem)
    if not re.fullmatch(r"[A-Za-z0-9._-]+", name):
        raise SweepError(f"{where}: name must use letters, digits, '.', '_' or '-'; got {name!r}")

    defaults = {k: v for k, v in TrainConfig().to_dict().items() if k not in RUNNER_PARAMETERS}
    allowed = set(defaults)
    base = load_preset(spec["base"]) if spec.get("base") else {}
    fixed = _mapping(spec, "params", where)
    grid = _mapping(spec, "grid", where)
    listed = spec.get("runs") or []
    if "grid" in spec and not grid:
        raise SweepError(f"{where}: grid is empty; give each swept parameter a non-empty list, "
                         "e.g. grid: {lmbda: [0, 1]}")
    if not isinstance(listed, list) or not all(isinstance(r, dict) for r in listed):
        raise SweepError(f"{where}: runs must be a list of mappings of train.ipynb parameters")
    if "runs" in spec and not listed:
        raise SweepError(f"{where}: runs is empty; list at least one configuration or drop the key")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise SweepError(f"{where}: grid.{key} must be a non-empty list of values, got {values!r}")
    seeds = spec.get("seeds")
    if seeds is not None and (not isinstance(seeds, list) or not seeds
                              or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)):
        raise SweepError(f"{where}: seeds must be a non-empty list of integers, got {seeds!r}")
    for section, keys in (("base", base), ("params", fixed), ("grid", grid),
                          *((f"runs[{i}]", r) for i, r in enumerate(listed))):
        bad = sorted(set(keys) - allowed)
        if bad:
            raise SweepError(f"{where}: {section}: unknown or runner-set parameter(s) {', '.join(bad)}; "
                             f"TrainConfig (train.ipynb) parameters: {', '.join(sorted(allowed))}")
    if "seed" in grid and seeds:
        raise SweepError(f"{where}: give seeds either as 'seeds' or as grid.seed, not both")
    do_eval = spec.get("eval", False)
    eval_parameters = spec.get("eval_parameters") or {}
    analysis = spec.get("analysis", True)
    for key, value in (("eval", do_eval), ("analysis", analysis)):
        if not isinstance(value, bool):
            raise SweepError(f"{where}: {key} must be true or false, got {value!r}")
    if not isinstance(eval_parameters, dict):
        raise SweepError(f"{where}: eval_parameters must be a mapping of eval.ipynb parameters")
    try:
        EvalConfig.check_overrides(eval_parameters, "eval_parameters")
    except ConfigError as err:
        raise SweepError(f"{where}: {err}") from None

    # Expansion: runs x grid x seeds, each over base and params.
    points = [dict(zip(grid, combo, strict=True)) for combo in itertools.product(*grid.values())]
    configs = []
    for entry in listed or [{}]:
        for point in points:
            for seed in seeds or [None]:
                values = {**entry, **point, **({"seed": seed} if seed is not None else {})}
                configs.append(values)
    full = [{**defaults, **base, **fixed, **values} for values in configs]
    varying_keys = [k for k in dict.fromkeys(k for values in configs for k in values)
                    if len({json.dumps(f.get(k), sort_keys=True) for f in full}) > 1]

    root = Path(resolve_path(outputs) if outputs else outputs_root()) / name
    runs: dict[str, Run] = {}
    for values, params in zip(configs, full, strict=True):
        varying = {k: params[k] for k in varying_keys}
        run_name = short_name(varying) or "run"
        params = {**params, "output_dir": portable_path(root / run_name), "do_eval": do_eval,
                  "eval_parameters": eval_parameters}
        try:
            TrainConfig.from_dict(params).validate()
        except ConfigError as err:
            shown = ", ".join(f"{k}={v!r}" for k, v in values.items()) or "the fixed parameters"
            raise SweepError(f"{where}: run {run_name} ({shown}): {err}") from None
        run = Run(root / run_name, params, varying)
        if run_name in runs and runs[run_name].params != run.params:
            raise SweepError(f"{where}: two runs map to {run.path} with different parameters; "
                             "make the swept values distinct")
        runs[run_name] = run
    sweep = Sweep(name, spec_path, root, list(runs.values()), do_eval, analysis)
    if check_models:
        _check_group_sizes(sweep, where)
    _check_conflicts(sweep)
    others = spec.get("analysis_with") or []
    if not isinstance(others, list) or not all(isinstance(o, str) for o in others):
        raise SweepError(f"{where}: analysis_with must be a list of sweep names, got {others!r}")
    expected = {**defaults, **base, **fixed, "do_eval": do_eval, "eval_parameters": eval_parameters}
    swept = set(varying_keys) | {k for values in configs for k in values}
    for other_name in others:
        if other_name == name:
            raise SweepError(f"{where}: analysis_with names the sweep itself")
        beside = spec_path.parent / f"{other_name}.yaml"  # a spec next to this one, else a shipped one
        other = expand(beside if beside.is_file() else other_name, outputs, check_models=False)
        for run in other.runs:
            _check_pooled(where, other, run, expected, swept, runs)
        sweep.analysis_with.append(other)
    return sweep


def _check_pooled(where: str, other: Sweep, run: Run, expected: dict[str, Any], swept: set[str],
                  own: dict[str, Run]) -> None:
    """A run of an ``analysis_with`` sweep must be one this sweep could have run: its settings equal
    this sweep's everywhere but the swept parameters, and it must not repeat one of this sweep's runs."""
    params = {k: v for k, v in run.params.items() if k != "output_dir"}
    keys = (set(expected) | set(params)) - swept
    differ = sorted(k for k in keys
                    if json.dumps(params.get(k), sort_keys=True) != json.dumps(expected.get(k), sort_keys=True))
    if differ:
        shown = ", ".join(f"{k} ({params.get(k)!r}, here {expected.get(k)!r})" for k in differ)
        raise SweepError(f"{where}: analysis_with: {other.name}'s run {run.name} differs from this sweep's "
                         f"settings in {shown}; only the swept parameters may differ")
    point = {k: params.get(k) for k in swept}
    for mine in own.values():
        if all(json.dumps(mine.params.get(k), sort_keys=True) == json.dumps(v, sort_keys=True)
               for k, v in point.items()):
            raise SweepError(f"{where}: analysis_with: {other.name}'s run {run.name} repeats this sweep's run "
                             f"{mine.name}; drop it from the grid or from analysis_with")


def read_spec(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A spec with its ``include:`` chain resolved: the including file's keys win, and its
    ``params``/``eval_parameters`` mappings extend the included ones key by key."""
    where = path.name
    if path.resolve() in seen:
        raise SweepError(f"{where}: include cycle through {', '.join(p.name for p in seen)}")
    spec = read_yaml(path, SweepError) or {}
    if not isinstance(spec, dict):
        raise SweepError(f"{where}: a sweep spec is a mapping with keys {', '.join(SPEC_KEYS)}")
    unknown = sorted(set(spec) - set(SPEC_KEYS))
    if unknown:
        raise SweepError(f"{where}: unknown key(s) {', '.join(unknown)}; a spec has {', '.join(SPEC_KEYS)}")
    include = spec.pop("include", None)
    if include is None:
        return spec
    included_path = path.parent / str(include)
    if not included_path.is_file():
        raise SweepError(f"{where}: include: {include!r} not found next to the spec")
    merged = read_spec(included_path, (*seen, path.resolve()))
    for key, value in spec.items():
        if key in ("params", "eval_parameters") and isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged


def _mapping(spec: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    value = spec.get(key) or {}
    if not isinstance(value, dict):
        raise SweepError(f"{where}: {key} must be a mapping of train.ipynb parameters, got {value!r}")
    return value


def _check_group_sizes(sweep: Sweep, where: str) -> None:
    # The one check train.ipynb makes against the model's layer shapes; from the config alone (no weights).
    from onpolicy_lib import calibrated_ptq, quantization
    from onpolicy_lib.models import load_skeleton

    pairs = {(r.params["model_name"], r.params["group_size"]) for r in sweep.runs}
    for model_name in sorted({m for m, _ in pairs}):
        try:
            skeleton = load_skeleton(model_name)
        except OSError:  # a hub model with no network here: train.ipynb checks it where it runs
            print(f"note: {model_name}'s config is not reachable here; group sizes are checked when the runs start")
            continue
        for _, group_size in (p for p in pairs if p[0] == model_name):
            try:
                quantization.resolve_group_size(skeleton, group_size)
            except ValueError as err:
                raise SweepError(f"{where}: {err}") from None
        # The original's GPTQ/AWQ recipes have their own groups: refused now, not after hours of training.
        methods = {m for r in sweep.runs if r.params["model_name"] == model_name
                   for m in r.params["eval_parameters"].get("calibrated") or [] if m in calibrated_ptq.ORIGINAL_RECIPES}
        for method in sorted(methods):
            try:
                calibrated_ptq.check_recipe(skeleton, model_name, method, calibrated_ptq.ORIGINAL_RECIPES[method])
            except calibrated_ptq.CalibratedError as err:
                raise SweepError(f"{where}: eval_parameters: {err}") from None


def _check_conflicts(sweep: Sweep) -> None:
    """Refuse a run directory that holds, or is promised by another spec to, a different configuration."""
    manifest = read_manifest(sweep.root)
    for run in sweep.runs:
        other = manifest.get("runs", {}).get(run.name)
        diff = config_diff(other["params"], run.params) if other is not None else {}
        if diff:
            raise SweepError(f"{sweep.spec_path.name}: {portable_path(run.path)} belongs to spec {other['spec']} "
                             f"with a different config ({format_diff(diff)}); rename this sweep (name:) or delete "
                             "that run")
        try:
            Run(run.path).plan(run.params)
        except ConfigError as err:
            raise SweepError(f"{sweep.spec_path.name}: {err}") from None


def record_manifest(sweep: Sweep) -> None:
    """Add this spec's runs to the sweep directory's manifest (several specs may share one directory)."""
    manifest = read_manifest(sweep.root)
    runs = manifest.get("runs", {})
    spec = portable_path(sweep.spec_path)
    for run in sweep.runs:
        params = {k: v for k, v in run.params.items() if k not in ("do_eval", "eval_parameters")}
        runs[run.name] = {"spec": spec, "params": params, "varying": run.varying}
    write_manifest(sweep.root, {"name": sweep.name, "specs": sorted({*manifest.get("specs", []), spec}),
                                "runs": runs})


# ---------------------------------------------------------------------------- state
def status_table(sweep: Sweep):
    """One row per run: name, state, varying values, wall time and headline numbers when done."""
    import pandas as pd

    rows = []
    for run in sweep.runs:
        row = {"run": run.name, "state": run.status(), **run.varying}
        metrics = run.metrics
        if metrics is not None:
            row["train_s"] = metrics.get("wall_time_s")
            row["heldout_after"] = metrics.get("heldout_loss_after")
        if run.file(run.ERROR).is_file():
            row["error"] = run.file(run.ERROR).read_text().strip().splitlines()[-1][:120]
        rows.append(row)
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------- running
def command(sweep: Sweep, run: Run, retry_failed: bool = False, processes: int = 1) -> str:
    """The shell line that runs one configuration through this runner (for a cluster scheduler)."""
    args = [sys.executable, "-m", "onpolicy_lib.sweep", portable_path(sweep.spec_path), "--run", run.name]
    if sweep.root.parent != outputs_root():
        args += ["--outputs", str(sweep.root.parent)]
    if retry_failed:
        args.append("--retry-failed")
    if processes > 1:
        args += ["--num-processes", str(processes)]
    return f"cd {shlex.quote(str(PROJECT_ROOT))} && " + shlex.join(args)


def training_command(params: dict[str, Any], processes: int) -> list[str]:
    """``accelerate launch --num_processes N -m onpolicy_lib.training -p NAME VALUE ...`` for one run."""
    args = [a for name, value in params.items()
            for a in ("-p", name, yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix(
                "\n...").strip())]
    launcher = [str(Path(sys.executable).with_name("accelerate")), "launch", "--num_processes", str(processes),
                "--num_machines", "1", "--multi_gpu", "--dynamo_backend", "no"]
    return [*launcher, "-m", "onpolicy_lib.training", *args]


def execute(run: Run, lock_fd: int, threads: int | None = None, processes: int = 1) -> str:
    """Run one configuration in a subprocess; returns its final state (done | failed).

    One process: papermill renders ``train.ipynb``. Several: ``accelerate launch`` runs the same
    parameters through ``python -m onpolicy_lib.training`` (no rendered training notebook; the
    evaluation notebook is still rendered with ``do_eval``). The subprocess inherits the run's lock,
    so the run counts as running exactly while it lives.
    """
    notebook = run.file(run.TRAIN_NOTEBOOK)
    params_yaml = yaml.safe_dump(run.params, sort_keys=False)
    args = [sys.executable, "-m", "papermill", portable_path(TRAIN_NOTEBOOK), portable_path(notebook),
            "-y", params_yaml, "--cwd", ".", "--kernel", "python3", "--no-progress-bar"]
    if processes > 1:
        args = training_command(run.params, processes)
    env = dict(os.environ)
    if threads:  # parallel runs share the cores instead of each taking all of them
        env.setdefault("OMP_NUM_THREADS", str(threads))
    with open(run.file(run.RUNNER_LOG), "a") as log:
        shown = [portable_path(Path(args[0])), *args[1:5]]  # an absolute interpreter path would not travel
        log.write(f"\n=== {datetime.datetime.now().isoformat()} {shlex.join(shown)} ...\n")
        log.flush()
        returncode = subprocess.run(args, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=PROJECT_ROOT,
                                    pass_fds=(lock_fd,)).returncode
    for rendered in run.path.glob("*.ipynb"):
        slim_notebook(rendered)
    runner_log = run.file(run.RUNNER_LOG)
    runner_log.write_text(portable_text(runner_log.read_text()))
    if returncode == 0 and run.status() == "done":
        return "done"
    run.file(run.ERROR).write_text(
        f"papermill exited with {returncode}; partial notebook: {portable_path(notebook)}; "
        f"log: {portable_path(run.file(run.RUNNER_LOG))}\n{_last_error(run)}\n")
    return "failed"


def slim_notebook(path: Path) -> None:
    """Make a rendered notebook fit to commit: no widget state, no machine-specific paths.

    tqdm's notebook progress bars (lm-eval draws hundreds) store megabytes of ipywidgets state
    that only re-draws the bars; the text fallback of each bar stays in the cell outputs. Paths
    that libraries print (warnings name their source files) are made project-relative.
    """
    import nbformat

    nb = nbformat.read(path, as_version=4)
    if nb.metadata.pop("widgets", None) is not None:
        for cell in nb.cells:
            for output in cell.get("outputs", []):
                output.get("data", {}).pop("application/vnd.jupyter.widget-view+json", None)
    nbformat.write(nb, path)
    path.write_text(portable_text(path.read_text()))


def _last_error(run: Run) -> str:
    log = run.file(run.RUNNER_LOG)
    lines = log.read_text().strip().splitlines() if log.is_file() else []
    errors = [ln for ln in lines if "Error" in ln or "error" in ln]
    return (errors or lines or ["(no output)"])[-1][:500]


def run_sweep(sweep: Sweep, parallel: int = 1, retry_failed: bool = False, only: list[str] | None = None,
              analysis: bool | None = None, processes: int = 1) -> dict[str, str]:
    """Run every run that is not done (failed ones only with ``retry_failed``); returns name -> final state."""
    from tqdm.auto import tqdm

    if parallel < 1:
        raise SweepError(f"parallel must be a positive integer, got {parallel!r}")
    selected = sweep.runs
    if only:
        names = {r.name for r in sweep.runs}
        unknown = [n for n in only if n not in names]
        if unknown:
            raise SweepError(f"--run: no run named {', '.join(unknown)} in {sweep.name}; "
                             f"runs: {', '.join(sorted(names))}")
        selected = [r for r in sweep.runs if r.name in only]
    if any(r.params.get("do_eval") and r.params["eval_parameters"].get("calibrated") for r in selected):
        from onpolicy_lib.calibrated_ptq import CalibratedError, llmc_python

        try:  # every run would train first and fail in its evaluation
            llmc_python()
        except CalibratedError as err:
            raise SweepError(f"{sweep.name}: eval_parameters.calibrated: {err}") from None
    record_manifest(sweep)
    states = {r.name: r.status() for r in selected}
    todo = [r for r in selected if states[r.name] in ("pending", "interrupted")
            or (retry_failed and states[r.name] == "failed")]
    skipped = {s: [n for n, st in states.items() if st == s and all(n != r.name for r in todo)]
               for s in ("done", "failed", "running")}
    print(f"sweep {sweep.name}: {len(selected)} runs; {len(skipped['done'])} done, {len(todo)} to run"
          + (f", {len(skipped['failed'])} failed (use --retry-failed)" if skipped["failed"] else "")
          + (f", {len(skipped['running'])} running elsewhere" if skipped["running"] else ""), flush=True)
    threads = max(1, (os.cpu_count() or 1) // parallel) if parallel > 1 else None

    def one(run: Run) -> str:
        lock_fd = run.claim()
        if lock_fd is None:
            return "running"
        try:
            if run.file(run.ERROR).is_file():  # a retry: keep the failed attempt beside the new one
                run.set_aside_failure()
            return execute(run, lock_fd, threads, processes)
        finally:
            run.release(lock_fd)

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=parallel) as pool, tqdm(total=len(todo), desc=sweep.name, unit="run") as bar:
        futures = {pool.submit(one, run): run for run in todo}
        for future in as_completed(futures):
            run = futures[future]
            states[run.name] = future.result()
            where = f" (see {portable_path(run.file(run.ERROR))})" if states[run.name] == "failed" else ""
            bar.write(f"{run.name}: {states[run.name]}{where} [{_elapsed(start)}]")
            bar.update()
    if (sweep.analysis if analysis is None else analysis) and not only \
            and all(r.status() == "done" for r in sweep.runs):
        waiting = [o.name for o in sweep.analysis_with if any(r.status() != "done" for r in o.runs)]
        if waiting:  # a pooled study still running would make a partial analysis look complete
            print(f"analysis waits for {', '.join(waiting)} (analysis_with): run "
                  + " and ".join(f"python -m onpolicy_lib.sweep {n}" for n in waiting))
        else:
            print(f"analysis rendered in {portable_path(render_analysis(sweep))}")
    return states


def render_analysis(sweep: Sweep) -> Path:
    """Render notebooks/analysis.ipynb over this sweep into outputs/<name>/analysis.ipynb (figures beside it)."""
    import papermill as pm

    out = sweep.root / ANALYSIS_NOTEBOOK
    roots = [sweep.root, *(other.root for other in sweep.analysis_with)]
    pm.execute_notebook(str(ANALYSIS_SOURCE), str(out), cwd=str(PROJECT_ROOT), progress_bar=False,
                        parameters={"outputs": [portable_path(r) for r in roots],
                                    "figures_dir": portable_path(sweep.root / FIGURES_DIR),
                                    "title": f"Sweep {sweep.name}",
                                    "as_sweep": sweep.name if sweep.analysis_with else ""})
    slim_notebook(out)
    return out


def _check_baselines_only(quant_type: str) -> None:
    from onpolicy_lib.config import QUANT_TYPES

    if quant_type not in QUANT_TYPES:
        raise SweepError(f"--baselines-only must be one of {', '.join(QUANT_TYPES)}, got {quant_type!r}")


def render_baselines_only(sweep: Sweep, quant_type: str) -> Path:
    """Evaluate the teacher and the quantized baselines at ``quant_type`` without students (a PTQ-only
    rung), with the sweep's model, group size and evaluation settings, into
    ``outputs/<sweep>/baselines-<quant_type>.ipynb``; cached like every baseline."""
    import papermill as pm

    _check_baselines_only(quant_type)
    settings = {json.dumps([r.params["model_name"], r.params["group_size"], r.params["eval_parameters"]],
                           sort_keys=True) for r in sweep.runs}
    if len(settings) != 1:
        raise SweepError(f"--baselines-only: {sweep.name}'s runs differ in model, group size or evaluation "
                         "settings, so no one baseline setting is theirs")
    params = sweep.runs[0].params
    out = sweep.root / BASELINES_NOTEBOOK.format(quant_type=quant_type)
    record = sweep.root / BASELINES_RECORD.format(quant_type=quant_type)
    for path in (out, record):
        if path.exists():
            raise SweepError(f"--baselines-only: {portable_path(path)} exists; delete it to evaluate again")
    out.parent.mkdir(parents=True, exist_ok=True)
    pm.execute_notebook(str(PROJECT_ROOT / "notebooks" / Run.EVAL_NOTEBOOK), str(out), cwd=str(PROJECT_ROOT),
                        progress_bar=False,
                        parameters={**params["eval_parameters"], "run_dirs": [], "model_name": params["model_name"],
                                    "quant_type": quant_type, "group_size": params["group_size"],
                                    "baselines_record": portable_path(record)})
    slim_notebook(out)
    return out


def _elapsed(start: float) -> str:
    return str(datetime.timedelta(seconds=int(time.perf_counter() - start)))


# ---------------------------------------------------------------------------- command line
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m onpolicy_lib.sweep", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("spec", help="a spec in params/sweeps/ (by stem) or a path")
    parser.add_argument("--dry-run", action="store_true", help="list the runs, their state and output paths")
    parser.add_argument("--status", action="store_true", help="a table of done / failed / pending runs")
    parser.add_argument("--emit-commands", action="store_true",
                        help="print one independent shell command per unfinished run (for any scheduler)")
    parser.add_argument("--parallel", type=int, default=1, help="runs executed at once (default 1)")
    parser.add_argument("--retry-failed", action="store_true", help="re-run failed runs (their notebooks are kept)")
    parser.add_argument("--run", action="append", help="only this run (repeatable)")
    parser.add_argument("--outputs", help="root of the sweep directory (default: outputs/)")
    parser.add_argument("--no-analysis", action="store_true", help="do not render the analysis notebook at the end")
    parser.add_argument("--analysis-only", action="store_true",
                        help="render the analysis notebook over the runs finished so far, and run nothing (a study "
                             "in progress, read while its runs continue elsewhere)")
    parser.add_argument("--baselines-only", action="append", metavar="QUANT_TYPE",
                        help="evaluate the teacher and the quantized baselines at this bit width without students, "
                             "with the sweep's settings (a PTQ-only rung; repeatable), then stop")
    parser.add_argument("--num-processes", type=int, default=1,
                        help="processes per run through accelerate launch (one per GPU; default 1: papermill)")
    args = parser.parse_args(argv)
    try:
        sweep = expand(args.spec, args.outputs)
        if args.dry_run or args.status:
            import pandas as pd

            table = status_table(sweep)
            if args.dry_run:
                table["output"] = [portable_path(r.file(r.TRAIN_NOTEBOOK)) for r in sweep.runs]
            with pd.option_context("display.max_rows", None, "display.width", 200, "display.max_colwidth", 80):
                print(f"sweep {sweep.name} ({portable_path(sweep.spec_path)}): {len(sweep.runs)} runs into "
                      f"{portable_path(sweep.root)}" + (", each evaluated" if sweep.eval else ""))
                print(table.to_string(index=False))
                for other in sweep.analysis_with:
                    done = sum(r.status() == "done" for r in other.runs)
                    print(f"its analysis also reads {other.name}'s {len(other.runs)} runs ({done} done; "
                          f"analysis_with)")
            return 0
        if args.analysis_only:
            done = sum(r.status() == "done" for r in sweep.runs)
            if not done:
                raise ConfigError(f"--analysis-only: no run of {sweep.name} is done yet under "
                                  f"{portable_path(sweep.root)}")
            print(f"analysis of {done} of {len(sweep.runs)} runs rendered in "
                  f"{portable_path(render_analysis(sweep))}")
            return 0
        if args.baselines_only:
            for quant_type in args.baselines_only:  # all checked before the first evaluation starts
                _check_baselines_only(quant_type)
            for quant_type in args.baselines_only:
                print(f"baselines rendered in {portable_path(render_baselines_only(sweep, quant_type))}")
            return 0
        if args.emit_commands:
            for run in sweep.runs:
                state = run.status()
                if state in ("pending", "interrupted") or (args.retry_failed and state == "failed"):
                    print(command(sweep, run, args.retry_failed, args.num_processes))
            return 0
        states = run_sweep(sweep, args.parallel, args.retry_failed, args.run,
                           analysis=False if args.no_analysis else None, processes=args.num_processes)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    failed = [n for n, s in states.items() if s == "failed"]
    if failed:
        print(f"{len(failed)} run(s) failed: {', '.join(failed)}; fix and re-run with --retry-failed", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
