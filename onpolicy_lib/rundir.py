"""Run directories: one per configuration, never overwritten silently.

A run directory holds ``config.json`` (every resolved parameter) from the
moment training starts. Coming back to it with the *same* configuration
resumes (from the last checkpoint) or, if the run finished, reports it as
complete; coming back with a *different* configuration is refused with the
fields that differ.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from onpolicy_lib.config import ConfigError

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.json"
EVAL_FILE = "eval.json"
# Fields that may change between attempts of the same run without changing what it trains.
UNSTARTED_FILES = {CONFIG_FILE, "eval_before.json"}
IGNORED_FOR_IDENTITY = {"do_eval", "output_dir", "device", "extra", "logging_steps", "save_steps"}


def is_runner_file(path: Path) -> bool:
    """Rendered notebooks and the sweep runner's bookkeeping (``sweep-*``): not part of a run's state."""
    return path.suffix == ".ipynb" or path.name.startswith("sweep-")


@dataclass
class RunDir:
    path: Path
    state: str  # "new" | "resume" | "complete"
    checkpoint: Path | None = None

    def describe(self) -> str:
        if self.state == "new":
            return f"new run in {self.path}"
        if self.state == "complete":
            return f"{self.path} already holds this finished run; reusing its results (nothing retrained)"
        where = f"from {self.checkpoint.name}" if self.checkpoint else "from the start (no checkpoint yet)"
        return f"resuming the unfinished run in {self.path} {where}"


def latest_checkpoint(path: Path) -> Path | None:
    checkpoints = [p for p in path.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()]
    return max(checkpoints, key=lambda p: int(p.name.split("-")[-1]), default=None)


def config_diff(old: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    keys = (set(old) | set(new)) - IGNORED_FOR_IDENTITY
    return {k: (old.get(k), new.get(k)) for k in sorted(keys) if old.get(k) != new.get(k)}


def format_diff(diff: dict[str, tuple[Any, Any]]) -> str:
    return "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())


def prepare_run_dir(path: Path, config: dict[str, Any]) -> RunDir:
    """Decide what to do with ``path`` for ``config``; refuse rather than overwrite."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"output_dir {path} exists and is not a directory")
    # A rendered notebook may already sit there: papermill writes its output before
    # the first cell runs, and sweeps render train.ipynb (and their own sweep-* files) there.
    if not path.exists() or all(is_runner_file(p) for p in path.iterdir()):
        return RunDir(path, "new")
    # A run that failed before its first training log (say, a typo in a hub id) has
    # nothing worth keeping; it can be claimed by any configuration.
    if {p.name for p in path.iterdir() if not is_runner_file(p)} <= UNSTARTED_FILES:
        return RunDir(path, "new")
    saved_file = path / CONFIG_FILE
    if not saved_file.is_file():
        raise ConfigError(f"output_dir {path} is not empty and holds no {CONFIG_FILE}; "
                          "refusing to write into it (choose another output_dir)")
    saved = json.loads(saved_file.read_text())
    diff = config_diff(saved.get("train", saved), config)
    if diff:
        raise ConfigError(f"output_dir {path} holds a run with a different config ({format_diff(diff)}); "
                          "choose another output_dir or delete that run")
    if (path / METRICS_FILE).is_file():
        return RunDir(path, "complete")
    return RunDir(path, "resume", latest_checkpoint(path))


def write_json(path: Path, data: Any) -> None:
    # Write-then-rename so a crash never leaves a half-written JSON behind.
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    tmp.replace(path)
