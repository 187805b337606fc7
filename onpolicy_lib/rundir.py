"""The on-disk layout of runs and sweeps: the one place that names their files.

A run directory holds ``config.json`` (every resolved parameter) from the moment training
starts, a streamed ``train_log.jsonl``, ``metrics.json`` when training finished (its presence
marks the run complete), the trained ``student/``, and ``eval.json`` once evaluated; rendered
notebooks and the sweep runner's ``sweep-*`` files sit beside them. :class:`Run` reads and
writes all of these. Coming back to a directory with the *same* configuration resumes it (from
its last complete checkpoint) or reuses it; a *different* configuration is refused with the fields that
differ. A sweep directory holds its runs, the manifest ``sweep.json`` and the rendered analysis.
"""

from __future__ import annotations

import fcntl
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from onpolicy_lib.config import ConfigError, TrainConfig, outputs_root, portable_path

# Sweep-level and outputs-level names.
MANIFEST = "sweep.json"
ANALYSIS_NOTEBOOK = "analysis.ipynb"
FIGURES_DIR = "figures"
EVAL_CACHE_DIR = "eval_cache"
# A baselines-only rung's results (``sweep --baselines-only``), beside the sweep's manifest.
BASELINES_NOTEBOOK = "baselines-{quant_type}.ipynb"
BASELINES_RECORD = "baselines-{quant_type}.json"


def write_json(path: Path, data: Any) -> None:
    # Write-then-rename so a crash never leaves a half-written JSON behind.
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    tmp.replace(path)


def read_json(path: Path) -> Any:
    """The file's JSON, or None if it is missing or being written (a live run's file)."""
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None


def eval_cache_dir(cache_dir: str | Path | None = None) -> Path:
    return Path(cache_dir) if cache_dir else outputs_root() / EVAL_CACHE_DIR


def config_diff(old: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Identity fields whose values differ between two training configurations.

    A field missing from a configuration was added after it was written: that run ran with the
    field's default (a new parameter's default keeps the old behaviour), so it compares as such; the
    rollout options, whose default became ``auto``, ran in their exact form. ``auto`` matches any
    fp32 rollout form (:func:`onpolicy_lib.rollouts.same_setting`): a resumed run keeps the form it chose.
    """
    from onpolicy_lib import rollouts

    defaults = {**TrainConfig().to_dict(), **rollouts.EXACT_SETTINGS}
    keys = TrainConfig.identity_fields()

    def same(k: str, a: Any, b: Any) -> bool:
        return rollouts.same_setting(k, a, b) if k in rollouts.OPTIONS else a == b

    return {k: (old.get(k, defaults[k]), new.get(k, defaults[k])) for k in keys
            if not same(k, old.get(k, defaults[k]), new.get(k, defaults[k]))}


def format_diff(diff: dict[str, tuple[Any, Any]]) -> str:
    return "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())


@dataclass
class Run:
    """One run directory. ``params``/``varying`` are set when a sweep planned it."""

    path: Path
    params: dict[str, Any] = field(default_factory=dict)  # train.ipynb parameters, runner-set ones included
    varying: dict[str, Any] = field(default_factory=dict)  # the values that distinguish it in its sweep
    state: str | None = None  # what plan() decided: new | resume | complete
    checkpoint: Path | None = None
    skipped_checkpoints: list[Path] = field(default_factory=list)  # later ones a kill left half-written
    # config.json as plan() found it: a resumed run's earlier record. Every process of a multi-process run
    # reads it here, before the main process rewrites that file for the new attempt.
    recorded: dict[str, Any] = field(default_factory=dict)

    CONFIG = "config.json"
    METRICS = "metrics.json"
    EVAL = "eval.json"
    EVAL_BEFORE = "eval_before.json"
    LOG = "train_log.jsonl"
    STUDENT = "student"
    SCHEME = "quantization.json"  # inside student/
    TRAIN_NOTEBOOK = "train.ipynb"
    EVAL_NOTEBOOK = "eval.ipynb"
    LOSS_FIGURE = "loss.png"
    EVAL_FIGURE = "eval.png"
    # The sweep runner's bookkeeping.
    LOCK = "sweep-running.lock"
    ERROR = "sweep-error.txt"
    RUNNER_LOG = "sweep-log.txt"
    # Files a run may hold before it trained anything: such a directory can be claimed by any config.
    UNSTARTED = frozenset({CONFIG, EVAL_BEFORE})
    # The Trainer writes a checkpoint's weights, optimizer and sampling state first and this file last.
    TRAINER_STATE = "trainer_state.json"

    def __post_init__(self) -> None:
        self.path = Path(self.path)

    @property
    def name(self) -> str:
        return self.path.name

    def file(self, name: str) -> Path:
        return self.path / name

    # ---------------------------------------------------------------- reading
    @property
    def record(self) -> dict[str, Any] | None:
        """``config.json``: ``train`` (the TrainConfig), ``versions``, ``device``, ``resolved``, ..."""
        return read_json(self.file(self.CONFIG))

    @property
    def train_config(self) -> dict[str, Any] | None:
        record = self.record
        return None if record is None else record.get("train", record)

    @property
    def metrics(self) -> dict[str, Any] | None:
        return read_json(self.file(self.METRICS))

    @property
    def evaluation(self) -> dict[str, Any] | None:
        return read_json(self.file(self.EVAL))

    def require_evaluation(self) -> dict[str, Any]:
        evaluation = self.evaluation
        if evaluation is None:
            raise FileNotFoundError(f"{self.path} has no {self.EVAL}; evaluate it with notebooks/eval.ipynb")
        return evaluation

    @property
    def eval_before(self) -> dict[str, Any] | None:
        return read_json(self.file(self.EVAL_BEFORE))

    def _log_records(self, key: str) -> dict[int, dict[str, Any]]:
        """The training log's records holding ``key``, by step (a resumed attempt's record wins)."""
        path = self.file(self.LOG)
        if not path.is_file():
            return {}
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return {r["step"]: r for r in records if key in r}

    def log(self) -> list[dict[str, Any]]:
        """Every training log record, across resumed attempts (later attempts win per step)."""
        train = self._log_records("loss")
        return [train[s] for s in sorted(train)]

    def eval_log(self) -> list[dict[str, Any]]:
        """The periodic held-out divergence (``eval_steps``) as ``{"step", "loss"}``, one per step."""
        evals = self._log_records("eval_loss")
        return [{"step": step, "loss": evals[step]["eval_loss"]} for step in sorted(evals)]

    @property
    def losses(self) -> list[float]:
        return [s["loss"] for s in (self.metrics or {}).get("steps", [])]

    @property
    def student_dir(self) -> Path:
        return self.file(self.STUDENT)

    def student_scheme(self) -> dict[str, Any]:
        """``model_name``, ``quant_type``, ``group_size`` and ``format`` of the saved student."""
        meta = read_json(self.student_dir / self.SCHEME)
        if meta is None:
            raise FileNotFoundError(f"run_dir {portable_path(self.path)}: no trained student "
                                    f"({self.STUDENT}/{self.SCHEME} missing)")
        return meta

    def checkpoints(self) -> list[Path]:
        found = [p for p in self.path.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()]
        return sorted(found, key=lambda p: int(p.name.split("-")[-1]))

    def checkpoint_complete(self, checkpoint: Path) -> bool:
        """Whether the Trainer finished writing ``checkpoint``: its trainer state, written last, reads back.
        A run killed while saving (or, with several processes, one process leaving while the main one still
        writes) leaves a checkpoint that would fail to load, or load without its step count."""
        return isinstance(read_json(checkpoint / self.TRAINER_STATE), dict)

    # ---------------------------------------------------------------- writing
    def write_record(self, record: dict[str, Any]) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        write_json(self.file(self.CONFIG), record)

    def write_metrics(self, metrics: dict[str, Any]) -> None:
        write_json(self.file(self.METRICS), metrics)  # written last: its presence marks the run complete

    def write_evaluation(self, evaluation: dict[str, Any]) -> None:
        write_json(self.file(self.EVAL), evaluation)

    def write_eval_before(self, values: dict[str, Any]) -> None:
        write_json(self.file(self.EVAL_BEFORE), values)

    def append_log(self, record: dict[str, Any]) -> None:
        with open(self.file(self.LOG), "a") as f:
            f.write(json.dumps(record) + "\n")

    def saved_config(self) -> dict[str, Any]:
        """The TrainConfig recorded in ``config.json``; a ConfigError naming the file if it is missing or
        corrupted (:attr:`train_config` reads a missing or unreadable file as None)."""
        path = self.file(self.CONFIG)
        if not path.is_file():
            raise ConfigError(f"output_dir {portable_path(self.path)} is not empty and holds no {self.CONFIG}; "
                              "refusing to write into it (choose another output_dir)")
        try:
            record = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            problem = f"not valid JSON: {err}"
        else:
            saved = record.get("train", record) if isinstance(record, dict) else None
            if isinstance(saved, dict):
                return saved
            problem = "not a run's configuration"
        raise ConfigError(f"output_dir {portable_path(self.path)}: its {self.CONFIG} is corrupted ({problem}); "
                          "refusing to write into it (restore that file, or choose another output_dir)")

    # ---------------------------------------------------------------- planning
    @staticmethod
    def is_runner_file(path: Path) -> bool:
        """Rendered notebooks and the sweep runner's bookkeeping (``sweep-*``): not part of a run's state."""
        return path.suffix == ".ipynb" or path.name.startswith("sweep-")

    def plan(self, config: dict[str, Any]) -> Run:
        """Decide new / resume / complete for ``config`` (a TrainConfig dict); refuse rather than overwrite."""
        path = self.path
        if path.exists() and not path.is_dir():
            raise ConfigError(f"output_dir {portable_path(path)} exists and is not a directory")
        self.state, self.checkpoint = "new", None
        # A rendered notebook may already sit there: papermill writes its output before
        # the first cell runs, and sweeps render train.ipynb (and their own sweep-* files) there.
        if not path.exists() or all(self.is_runner_file(p) for p in path.iterdir()):
            return self
        # A run that failed before its first training log (say, a typo in a hub id) has
        # nothing worth keeping; it can be claimed by any configuration.
        if {p.name for p in path.iterdir() if not self.is_runner_file(p)} <= self.UNSTARTED:
            return self
        saved = self.saved_config()
        diff = config_diff(saved, config)
        if diff:
            raise ConfigError(f"output_dir {portable_path(path)} holds a run with a different config "
                              f"({format_diff(diff)}); choose another output_dir or delete that run")
        if self.file(self.METRICS).is_file():
            # student/ is not kept in git: a finished run checked out on another machine has its
            # metrics but nothing to evaluate. Say so now, not after the evaluation notebook starts.
            if (config.get("do_eval") and not self.file(self.EVAL).is_file()
                    and not (self.student_dir / self.SCHEME).is_file()):
                raise ConfigError(f"output_dir {portable_path(path)} holds a finished run's metrics but not its "
                                  f"student weights ({self.STUDENT}/ is not kept in git), so it cannot be "
                                  "evaluated; delete that run directory to retrain it")
            self.state = "complete"
        else:
            self.state = "resume"
            self.recorded = self.record or {}
            found = self.checkpoints()
            complete = [c for c in found if self.checkpoint_complete(c)]
            self.checkpoint = complete[-1] if complete else None
            after = found.index(self.checkpoint) + 1 if self.checkpoint else 0
            self.skipped_checkpoints = found[after:]
        return self

    def describe(self) -> str:
        where = portable_path(self.path)
        if self.state == "new":
            return f"new run in {where}"
        if self.state == "complete":
            return f"{where} already holds this finished run; reusing its results (nothing retrained)"
        start = f"from {self.checkpoint.name}" if self.checkpoint else "from the start (no checkpoint yet)"
        if self.skipped_checkpoints:
            names = ", ".join(c.name for c in self.skipped_checkpoints)
            start += f" ({names} skipped: written only in part when the run stopped; overwritten as training passes it)"
        return f"resuming the unfinished run in {where} {start}"

    # ---------------------------------------------------------------- status, for sweeps
    def status(self) -> str:
        """done | failed | running | interrupted | pending, from the files in the run directory alone."""
        do_eval = self.params.get("do_eval", (self.train_config or {}).get("do_eval", False))
        if self.file(self.METRICS).is_file() and (not do_eval or self.file(self.EVAL).is_file()):
            return "done"
        if self.is_locked():
            return "running"
        if self.file(self.ERROR).is_file():
            return "failed"
        if self.file(self.CONFIG).is_file():
            return "interrupted"  # killed mid-run: resumes from its last checkpoint
        return "pending"

    def is_locked(self) -> bool:
        lock = self.file(self.LOCK)
        if not lock.is_file():
            return False
        with open(lock) as f:
            try:
                fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
        return False

    def claim(self) -> int | None:
        """Lock the run for this process; a file descriptor to hand to the worker, or None if taken.

        An flock is released by the kernel when its last holder exits, however it exits: no pid
        files to check or clean up. Handed to the worker process (``pass_fds``), the lock lives
        exactly as long as the run's worker does, even if this process is killed.
        """
        self.path.mkdir(parents=True, exist_ok=True)
        lock = self.file(self.LOCK)
        while True:
            fd = os.open(lock, os.O_CREAT | os.O_RDWR)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return None
            try:  # the holder we waited on may have removed the file meanwhile: lock the current one
                if os.fstat(fd).st_ino == os.stat(lock).st_ino:
                    return fd
            except FileNotFoundError:
                pass
            os.close(fd)

    def release(self, fd: int) -> None:
        self.file(self.LOCK).unlink(missing_ok=True)
        os.close(fd)

    def set_aside_failure(self) -> None:
        """Keep a failed attempt's notebook and error beside the retry, numbered."""
        n = 1 + len(list(self.path.glob("sweep-failed-*.ipynb")))
        if self.file(self.TRAIN_NOTEBOOK).is_file():
            self.file(self.TRAIN_NOTEBOOK).rename(self.file(f"sweep-failed-{n}.ipynb"))
        if self.file(self.ERROR).is_file():
            self.file(self.ERROR).rename(self.file(f"sweep-error-{n}.txt"))


def read_manifest(sweep_root: Path) -> dict[str, Any]:
    return read_json(Path(sweep_root) / MANIFEST) or {}


def write_manifest(sweep_root: Path, manifest: dict[str, Any]) -> None:
    Path(sweep_root).mkdir(parents=True, exist_ok=True)
    write_json(Path(sweep_root) / MANIFEST, manifest)
