"""The training configuration: one dataclass, its validation and its run name.

The field names are exactly the parameters of ``notebooks/train.ipynb``; the
defaults are the CPU demo. Validation is cheap and runs before any model or
dataset is loaded, so bad input fails in a second with one line that names
the parameter and what it accepts.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from onpolicy_lib.assets import PACKAGED_MODEL, require_assets

PROJECT_ROOT = Path(__file__).resolve().parents[1]
PARAMS_DIR = PROJECT_ROOT / "params"
# Mirrors onpolicy_lib.quantization.QUANT_TYPES (checked by a test) without importing torchao here,
# so validating a config stays instant.
QUANT_TYPES = ("int4", "int8", "int3", "int2")


class ConfigError(ValueError):
    """Bad user input, reported before any heavy compute."""


@dataclass
class TrainConfig:
    # What is distilled into what.
    model_name: str = PACKAGED_MODEL
    dataset_name: str = "offline-mixture"
    quant_type: str = "int4"
    group_size: int | None = None  # None: the model's default (64 for the packaged model)
    # GKD (Agarwal et al. 2023), with TRL's GKDConfig meanings and defaults.
    lmbda: float = 0.5  # probability a batch uses student-generated completions
    beta: float = 0.5  # generalized JSD: 0 = forward KL, 1 = reverse KL
    temperature: float = 0.9  # sampling temperature of rollouts
    seq_kd: bool = False  # off-policy batches use teacher generations instead of the dataset's
    max_new_tokens: int = 32
    min_new_tokens: int = 0
    # Optimisation.
    learning_rate: float = 1e-4
    per_device_train_batch_size: int = 2
    gradient_accumulation_steps: int = 1
    max_steps: int = 60
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    max_length: int = 256
    # LoRA: lora_r=None means full fine-tuning of the (fake-quantized) weights.
    lora_r: int | None = None
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    seed: int = 42
    output_dir: str | None = None  # None: outputs/<name from the non-default parameters>
    do_eval: bool = False
    # Bookkeeping beyond the list.
    logging_steps: int = 1
    save_steps: int = 50  # checkpoint cadence, so a killed run resumes
    heldout_eval_size: int = 32  # held-out chat examples for the eval loss before/after training
    device: str = "auto"  # auto | cpu | cuda
    extra: dict[str, Any] = field(default_factory=dict)  # free-form notes carried into config.json

    # ---------------------------------------------------------------- validation
    def validate(self) -> TrainConfig:
        """Raise ConfigError on the first bad field; cheap, no I/O beyond stat calls."""
        for name in ("lmbda", "beta"):
            value = getattr(self, name)
            if not _is_number(value) or not 0.0 <= value <= 1.0:
                raise ConfigError(f"{name} must be a number in [0, 1], got {value!r}")
        if self.quant_type not in QUANT_TYPES:
            raise ConfigError(f"quant_type must be one of {', '.join(QUANT_TYPES)}; got {self.quant_type!r}")
        if self.group_size is not None:
            _positive_int("group_size", self.group_size)
        for name in ("per_device_train_batch_size", "gradient_accumulation_steps", "max_steps",
                     "max_length", "max_new_tokens", "logging_steps", "save_steps", "heldout_eval_size"):
            _positive_int(name, getattr(self, name))
        if not isinstance(self.min_new_tokens, int) or not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ConfigError(f"min_new_tokens must be an integer in [0, max_new_tokens={self.max_new_tokens}]"
                              f", got {self.min_new_tokens!r}")
        if self.max_new_tokens >= self.max_length:
            raise ConfigError(f"max_new_tokens must be smaller than max_length={self.max_length}, "
                              f"got {self.max_new_tokens}")
        for name in ("temperature", "learning_rate"):
            value = getattr(self, name)
            if not _is_number(value) or not value > 0 or not math.isfinite(value):
                raise ConfigError(f"{name} must be a positive number, got {value!r}")
        if not _is_number(self.warmup_ratio) or not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"warmup_ratio must be a number in [0, 1), got {self.warmup_ratio!r}")
        if not _is_number(self.weight_decay) or self.weight_decay < 0:
            raise ConfigError(f"weight_decay must be a non-negative number, got {self.weight_decay!r}")
        if self.lora_r is not None:
            _positive_int("lora_r", self.lora_r)
            _positive_int("lora_alpha", self.lora_alpha)
            if not _is_number(self.lora_dropout) or not 0.0 <= self.lora_dropout < 1.0:
                raise ConfigError(f"lora_dropout must be a number in [0, 1), got {self.lora_dropout!r}")
        for name in ("seq_kd", "do_eval"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ConfigError(f"seed must be an integer, got {self.seed!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"device must be one of auto, cpu, cuda; got {self.device!r}")
        _check_model_name(self.model_name)
        from onpolicy_lib.data import OFFLINE_MIXTURE, check_dataset_name

        try:
            check_dataset_name(self.dataset_name)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        if self.model_name == PACKAGED_MODEL or self.dataset_name == OFFLINE_MIXTURE:
            require_assets()  # fails naming the setup command
        return self

    # ---------------------------------------------------------------- naming
    def non_default(self) -> dict[str, Any]:
        """Fields that differ from the defaults (bookkeeping fields excluded)."""
        defaults = TrainConfig()
        skip = {"output_dir", "do_eval", "extra", "logging_steps", "device"}
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name not in skip and getattr(self, f.name) != getattr(defaults, f.name)}

    def run_name(self) -> str:
        """A readable directory name from the non-default hyperparameters, e.g. ``lmbda-1_lr-5e-05``."""
        return short_name(self.non_default()) or "default"

    def resolved_output_dir(self) -> Path:
        return outputs_root() / self.run_name() if self.output_dir is None else resolve_path(self.output_dir)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ConfigError(f"unknown parameter(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
        return cls(**values)


_SHORT = {"learning_rate": "lr", "per_device_train_batch_size": "bs", "gradient_accumulation_steps": "ga",
          "max_new_tokens": "newtok", "min_new_tokens": "minnew", "model_name": "model",
          "dataset_name": "data", "quant_type": "q", "group_size": "g", "max_steps": "steps",
          "warmup_ratio": "warmup", "weight_decay": "wd", "max_length": "maxlen", "temperature": "temp"}


def short_name(values: dict[str, Any]) -> str:
    """``{"learning_rate": 5e-05, "lmbda": 1}`` -> ``lr-5e-05_lmbda-1``: a file-system-safe run name."""
    name = "_".join(f"{_SHORT.get(k, k)}-{_fmt(v)}" for k, v in values.items())
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name)[:150]


def _fmt(value: Any) -> str:
    if isinstance(value, str):
        return Path(value).name if "/" in value else value
    return f"{value:g}" if isinstance(value, float) else str(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _positive_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")


def _check_model_name(name: Any) -> None:
    # Accept the packaged alias, a local directory or .gguf file, or a hub-id-shaped string.
    # Hub ids are not looked up here: that would need the network before anything else ran.
    if isinstance(name, str) and name:
        if name == PACKAGED_MODEL:
            return
        path = Path(name).expanduser()
        if name.endswith(".gguf"):
            if path.is_file():
                return
            raise ConfigError(f"model_name: GGUF file {name!r} does not exist")
        if path.is_dir():
            if (path / "config.json").is_file():
                return
            raise ConfigError(f"model_name: directory {name!r} has no config.json (not a HF model directory)")
        if re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", name) and not path.exists():
            return
    raise ConfigError(f"model_name must be {PACKAGED_MODEL!r}, a hub id like 'Qwen/Qwen3-4B-Instruct-2507', "
                      f"a local model directory or a .gguf file; got {name!r}")


def resolve_path(path: str | Path) -> Path:
    """Relative paths are relative to the project root, wherever the notebook kernel runs."""
    path = Path(path).expanduser()
    return path if path.is_absolute() else PROJECT_ROOT / path


def outputs_root() -> Path:
    return PROJECT_ROOT / "outputs"


def load_preset(name_or_path: str) -> dict[str, Any]:
    """Parameters from a YAML preset in ``params/`` (by stem) or at a path.

    A preset is a flat mapping of train.ipynb parameters, so papermill can take it
    as is (``-f params/cpu_demo.yaml``). Only here, an optional ``base:`` key names
    another preset whose values it overrides.
    """
    path = Path(name_or_path)
    if not path.suffix:
        path = PARAMS_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        available = ", ".join(sorted(p.stem for p in PARAMS_DIR.glob("*.yaml")))
        raise ConfigError(f"preset {name_or_path!r} not found; available presets: {available}")
    values = yaml.safe_load(path.read_text()) or {}
    base = values.pop("base", None)
    merged = load_preset(base) if base else {}
    merged.update(values)
    TrainConfig.from_dict(merged)  # unknown keys fail here, naming them
    return merged
