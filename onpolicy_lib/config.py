"""Every user-facing parameter, declared once: :class:`TrainConfig` and :class:`EvalConfig`.

Each field carries its help text and whether it belongs to a run's *identity* (what it trains)
in its metadata, in the manner of TRL's ``GKDConfig``. Everything else derives from these
declarations: the notebooks' ``parameters`` cells (generated, and tested equal:
``python -m onpolicy_lib.config --write-notebooks``), presets and sweep validation, run names
and run identity, the step benchmark's defaults and ``DistillConfig``'s GKD fields.

Validation is cheap and runs before any model or dataset is loaded, so bad input fails in a
second with one line that names the parameter and what it accepts.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import math
import re
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from onpolicy_lib import rollouts
from onpolicy_lib.assets import PACKAGED_MODEL, PACKAGED_MODELS, cache_dir, require_assets
from onpolicy_lib.schemes import QUANT_TYPES

PROJECT_ROOT = Path(__file__).resolve().parents[1]
PARAMS_DIR = PROJECT_ROOT / "params"
NOTEBOOKS_DIR = PROJECT_ROOT / "notebooks"
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "bfloat16")
DIVERGENCES = ("jsd", "cakld")
# Live trackers the Trainer can report to, each with the packages that provide it (any one will do); the
# extra of its name installs it.
TRACKERS = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",), "trackio": ("trackio",)}
# On the students' grid, then the original study's own llmcompressor recipes (calibrated_ptq.ORIGINAL_RECIPES).
CALIBRATED_METHODS = ("gptq", "awq", "gptq-original", "awq-original")
ASSETS_PREFIX = "assets:"


class ConfigError(ValueError):
    """Bad user input, reported before any heavy compute."""


def param(default: Any = dataclasses.MISSING, help: str = "", *, identity: bool = True, short: str | None = None,
          default_factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field with its help text, run-identity flag and short name (for run names)."""
    metadata = {"help": help, "identity": identity, "short": short}
    if default_factory is not dataclasses.MISSING:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


# ---------------------------------------------------------------------------- checks shared by all configs
def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def check_int(name: str, value: Any, minimum: int = 1, allow_none: bool = False) -> None:
    """``value`` is an int >= ``minimum`` (or None when allowed); ConfigError naming ``name`` otherwise."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        kind = {1: "a positive integer", 0: "a non-negative integer"}.get(minimum, f"an integer >= {minimum}")
        raise ConfigError(f"{name} must be {kind}{' or None' if allow_none else ''}, got {value!r}")


def _check_fraction(name: str, value: Any, upper_open: bool = False) -> None:
    ok = is_number(value) and 0.0 <= value and (value < 1.0 if upper_open else value <= 1.0)
    if not ok:
        raise ConfigError(f"{name} must be a number in [0, 1{')' if upper_open else ']'}, got {value!r}")


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be True or False, got {value!r}")


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


class _Params:
    """What both configs share: construction from a mapping, identity and field metadata."""

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def identity_fields(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls) if f.metadata.get("identity", True)]

    @classmethod
    def help(cls, name: str) -> str:
        return next(f.metadata.get("help", "") for f in dataclasses.fields(cls) if f.name == name)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Any:
        names = cls.field_names()
        unknown = sorted(set(values) - set(names))
        if unknown:
            raise ConfigError(f"unknown parameter(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
        return cls(**values)

    @classmethod
    def from_namespace(cls, namespace: dict[str, Any]) -> Any:
        """The config from a notebook's globals (its parameters cell defines every field)."""
        return cls(**{name: namespace[name] for name in cls.field_names()})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------- training
@dataclass
class TrainConfig(_Params):
    """One distillation run. The defaults are the CPU demo."""

    # What is distilled into what.
    model_name: str = param(PACKAGED_MODEL, f"packaged alias ({', '.join(PACKAGED_MODELS)}), hub id, local "
                            "directory or .gguf file", short="model")
    dataset_name: str = param("offline-mixture", "offline alias, hub dataset with a `messages` column, or local dir",
                              short="data")
    quant_type: str = param("int4", "int4, int8, int3 or int2", short="q")
    group_size: int | None = param(None, "None: the model's default (64 for the packaged model)", short="g")
    quantize_head: bool = param(False, "also quantize the output head (torchao's default filter, the original "
                                "study's choice); a tied input embedding stays full precision", short="qhead")
    # GKD (Agarwal et al. 2023), with TRL's GKDConfig meanings and defaults.
    lmbda: float = param(0.5, "probability a batch is on-policy (the student's own samples)")
    beta: float = param(0.5, "generalized JSD: 0 is forward KL, 1 is reverse KL")
    divergence: str = param("jsd", "jsd (GKD's generalized JSD, set by beta) or cakld (BitDistiller's confidence-"
                            "aware KL: the teacher's mean confidence on training chats weights reverse against "
                            "forward KL; beta unused)", short="div")
    cakld_confidence_chats: int = param(128, "training chats the teacher's confidence for cakld is measured on",
                                        short="cakldn")
    temperature: float = param(0.9, "rollout sampling temperature", short="temp")
    seq_kd: bool = param(False, "off-policy batches use teacher samples instead of dataset completions")
    max_new_tokens: int = param(32, "rollout length", short="newtok")
    min_new_tokens: int = param(0, "minimum rollout length", short="minnew")
    rollout_dtype: str = param("auto", "weights the student samples rollouts with: auto (float32, the default), "
                               "float32 (exact) or bfloat16 (opt-in, another policy within bf16 rounding; never "
                               "chosen by auto)", short="rolldt")
    rollout_matmul: str = param("auto", "how the student's rollout decode steps multiply by its weights: auto (the "
                                "fastest on this machine, measured once and cached), linear (F.linear, exact), "
                                "weight_major (weight @ x^T) or packed (weights reordered once per rollout for "
                                "oneDNN): other CPU kernels, the same policy within float rounding", short="rollmm")
    rollout_compile: bool | str = param("auto", "compile the student's rollout decode step: auto (only where the "
                                        "run's rollouts earn back the compile, measured), True or False. A static "
                                        "KV cache per batch and one torch.compile'd step on an in-place copy of the "
                                        "student's rollout weights; the same policy within float rounding",
                                        short="rollcomp")
    # Optimisation.
    learning_rate: float = param(1e-4, "peak learning rate (AdamW, linear schedule with warm-up)", short="lr")
    per_device_train_batch_size: int = param(2, "chats per micro-batch", short="bs")
    gradient_accumulation_steps: int = param(1, "micro-batches per optimizer step", short="ga")
    max_steps: int = param(60, "optimizer steps", short="steps")
    warmup_ratio: float = param(0.1, "share of max_steps spent warming up", short="warmup")
    weight_decay: float = param(0.0, "AdamW weight decay", short="wd")
    max_length: int = param(256, "prompt + completion tokens; longer examples are truncated", short="maxlen")
    min_completion_tokens: int = param(32, "examples need this many completion tokens within max_length "
                                       "(the original study's filter)", short="mincomp")
    train_embeddings: bool = param(False, "also train the tied embedding/head matrix, which the student keeps "
                                   "unquantized (extra full-precision capacity); False: frozen, as with LoRA",
                                   short="emb")
    # LoRA: lora_r=None means full fine-tuning of the fake-quantized weights.
    lora_r: int | None = param(None, "None: full fine-tuning of the fake-quantized weights")
    lora_alpha: int = param(16, "LoRA scaling numerator (used with lora_r)")
    lora_dropout: float = param(0.05, "LoRA dropout (used with lora_r; 0 in effect under disable_dropout)")
    disable_dropout: bool = param(True, "set every dropout module of the student to p=0, LoRA's included, as "
                                  "TRL's GKD does by default (the original study inherited it)", short="nodrop")
    dtype: str = param("auto", "the teacher's compute dtype: auto (float32 on CPU, bfloat16 on CUDA), float32 or "
                       "bfloat16; weights that train are kept in float32 (master weights) and computed in it "
                       "under autocast", short="dt")
    seed: int = param(42, "seeds initialisation, data order, policy draws and sampling")
    heldout_eval_size: int = param(32, "held-out chats scored before and after training")
    # Bookkeeping: where and how the run is kept, not what it trains.
    output_dir: str | None = param(None, "None: outputs/<name from the non-default parameters>", identity=False)
    do_eval: bool = param(False, "run the evaluation notebook on the trained student", identity=False)
    eval_parameters: dict = param(help="EvalConfig overrides for do_eval, e.g. {'limit': 20}", identity=False,
                                  default_factory=dict)
    save_steps: int = param(50, "checkpoint cadence; a killed run resumes from its last complete one", identity=False)
    eval_steps: int | None = param(None, "held-out divergence every this many steps (the curve); None: "
                                   "before and after training only", identity=False)
    logging_steps: int = param(1, "optimizer steps between log records", identity=False)
    device: str = param("auto", "auto, cpu or cuda", identity=False)
    fsdp: bool = param(False, "full fine-tuning sharded across the processes of `accelerate launch` (FSDP2: each "
                       "decoder layer and the root; the teacher stays whole on every process); one process runs "
                       "unsharded; LoRA runs use DDP", identity=False)
    report_to: str | list = param("none", "live training curves: none, tensorboard (event files under the run "
                                  "directory's runs/), wandb or trackio, or a list of them; each gets the run's "
                                  "parameters and reads its own environment variables (WANDB_PROJECT, ...)",
                                  identity=False)

    # ---------------------------------------------------------------- validation
    def validate(self) -> TrainConfig:
        """Raise ConfigError on the first bad field; cheap, no I/O beyond stat calls."""
        for name in ("lmbda", "beta"):
            _check_fraction(name, getattr(self, name))
        _check_choice("quant_type", self.quant_type, QUANT_TYPES)
        check_int("group_size", self.group_size, allow_none=True)
        for name in ("per_device_train_batch_size", "gradient_accumulation_steps", "max_steps",
                     "max_length", "max_new_tokens", "logging_steps", "save_steps", "heldout_eval_size"):
            check_int(name, getattr(self, name))
        if not isinstance(self.min_new_tokens, int) or not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ConfigError(f"min_new_tokens must be an integer in [0, max_new_tokens={self.max_new_tokens}]"
                              f", got {self.min_new_tokens!r}")
        if self.max_new_tokens >= self.max_length:
            raise ConfigError(f"max_new_tokens must be smaller than max_length={self.max_length}, "
                              f"got {self.max_new_tokens}")
        check_int("min_completion_tokens", self.min_completion_tokens)
        if self.min_completion_tokens >= self.max_length:
            raise ConfigError(f"min_completion_tokens must be smaller than max_length={self.max_length}, "
                              f"got {self.min_completion_tokens}")
        check_int("eval_steps", self.eval_steps, allow_none=True)
        for name in ("temperature", "learning_rate"):
            value = getattr(self, name)
            if not is_number(value) or not value > 0 or not math.isfinite(value):
                raise ConfigError(f"{name} must be a positive number, got {value!r}")
        _check_fraction("warmup_ratio", self.warmup_ratio, upper_open=True)
        if not is_number(self.weight_decay) or self.weight_decay < 0:
            raise ConfigError(f"weight_decay must be a non-negative number, got {self.weight_decay!r}")
        if self.lora_r is not None:
            check_int("lora_r", self.lora_r)
            check_int("lora_alpha", self.lora_alpha)
            _check_fraction("lora_dropout", self.lora_dropout, upper_open=True)
        for name in ("seq_kd", "do_eval", "train_embeddings", "disable_dropout", "quantize_head", "fsdp"):
            _check_bool(name, getattr(self, name))
        if self.fsdp and self.lora_r is not None:
            raise ConfigError(f"fsdp shards full fine-tuning; LoRA (lora_r={self.lora_r}) trains small adapters "
                              "and uses DDP: set lora_r None or fsdp False")
        check_int("seed", self.seed, minimum=-(2**63))
        _check_choice("device", self.device, DEVICES)
        _check_choice("dtype", self.dtype, DTYPES)
        self.trackers()
        try:
            rollouts.check_options(self.rollout_dtype, self.rollout_matmul, self.rollout_compile, fsdp=self.fsdp,
                                   lora_r=self.lora_r)
        except rollouts.RolloutOptionError as err:
            raise ConfigError(str(err)) from None
        _check_choice("divergence", self.divergence, DIVERGENCES)
        check_int("cakld_confidence_chats", self.cakld_confidence_chats)
        if not isinstance(self.eval_parameters, dict):
            raise ConfigError(f"eval_parameters must be a mapping of EvalConfig parameters, "
                              f"got {self.eval_parameters!r}")
        if self.do_eval or self.eval_parameters:
            EvalConfig.check_overrides(self.eval_parameters, "eval_parameters")
        _check_model_name(self.model_name)
        from onpolicy_lib.data import OFFLINE_MIXTURE, check_dataset_name

        try:
            check_dataset_name(self.dataset_name)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        if self.model_name == PACKAGED_MODEL or self.dataset_name == OFFLINE_MIXTURE:
            require_assets()  # fails naming the setup command
        return self

    def trackers(self) -> list[str]:
        """``report_to`` as a list of tracker names ([] for none), each checked to be known and installed."""
        value = self.report_to
        names = _as_list(value) if isinstance(value, str | list | tuple) else None
        if names is None or not all(isinstance(n, str) for n in names) or (names != ["none"] and "none" in names):
            raise ConfigError(f"report_to must be none, one of {', '.join(TRACKERS)} or a list of them; "
                              f"got {value!r}")
        names = [] if names == ["none"] else list(dict.fromkeys(names))
        for name in names:
            _check_choice("report_to", name, ("none", *TRACKERS))
            if not any(importlib.util.find_spec(package) for package in TRACKERS[name]):
                raise ConfigError(f"report_to {name!r} needs the {TRACKERS[name][0]} package, which is not "
                                  f"installed: pip install -e '.[{name}]'")
        return names

    # ---------------------------------------------------------------- naming
    def non_default(self) -> dict[str, Any]:
        """Identity fields that differ from the defaults."""
        defaults = TrainConfig()
        return {name: getattr(self, name) for name in self.identity_fields()
                if getattr(self, name) != getattr(defaults, name)}

    def run_name(self) -> str:
        """A readable directory name from the non-default identity fields, e.g. ``lmbda-1_lr-5e-05``."""
        return short_name(self.non_default()) or "default"

    def resolved_output_dir(self) -> Path:
        return outputs_root() / self.run_name() if self.output_dir is None else resolve_path(self.output_dir)


# ---------------------------------------------------------------------------- evaluation
# The evaluation benchmarks (lm-eval task names) and how tables and figures name them.
BENCHMARKS = {"hellaswag": "HellaSwag", "arc_easy": "ARC-Easy", "arc_challenge": "ARC-Challenge",
              "winogrande": "WinoGrande", "mmlu": "MMLU"}
TEXT_SOURCES = ("lambada-offline", "wikitext-2")


def check_tasks(tasks: str | list[str]) -> list[str]:
    """The benchmark names in ``tasks`` (a list, or a comma-separated string), checked against BENCHMARKS.

    Cheap (no model, no data): for validating parameters up front. Order kept, duplicates dropped.
    """
    names = [t.strip() for t in tasks.split(",") if t.strip()] if isinstance(tasks, str) else list(tasks)
    if not all(isinstance(t, str) for t in names):
        raise ConfigError(f"tasks must be a list of names from {', '.join(BENCHMARKS)}; got {tasks!r}")
    unknown = [t for t in names if t not in BENCHMARKS]
    if unknown:
        raise ConfigError(f"tasks: unknown benchmark(s) {', '.join(map(repr, unknown))}; "
                          f"expected names from {', '.join(BENCHMARKS)}")
    return list(dict.fromkeys(names))


@dataclass
class EvalConfig(_Params):
    """One evaluation: students of ``run_dirs`` beside the teacher and the PTQ baseline."""

    run_dirs: list = param(help="run directories with a trained student",
                           default_factory=lambda: ["outputs/cpu-demo"])
    tasks: list = param(help="benchmarks: hellaswag, arc_easy, arc_challenge, winogrande, mmlu",
                        default_factory=lambda: list(BENCHMARKS))
    limit: int | None = param(100, "documents per task, a seeded random sample (None: the whole split)")
    mmlu_limit: int | None = param(5, "documents per MMLU subject, 57 subjects (None: use limit)")
    task_limits: dict = param(help="per-benchmark overrides of limit, e.g. {'arc_easy': None}",
                              default_factory=dict)
    sample_seed: int = param(1234, "seed of the benchmark document samples (the same for every model)")
    batch_size: int = param(8, "lm-eval batch size")
    num_fewshot: int | None = param(None, "None: lm-eval's default for each task (0 for these five)")
    include_teacher: bool = param(True, "evaluate the teacher (cached)")
    include_ptq: bool = param(True, "evaluate the PTQ baseline in the students' scheme (cached)")
    calibrated: list = param(help="calibrated PTQ baselines: gptq, awq (on the students' grid), gptq-original, "
                             "awq-original (the original study's W4A16 / W4A16_ASYM g128 recipes); llmcompressor in "
                             "its own environment (make baselines-env); cached", default_factory=list)
    calibration_samples: int = param(64, "training chats GPTQ/AWQ calibrate on (a seeded sample)")
    calibration_seed: int = param(0, "seed of that sample: one calibration per scheme, whatever the students' "
                                  "training seeds")
    fidelity_samples: int = param(32, "held-out chats for the fidelity metrics (0: skip)")
    perplexity_source: str = param("lambada-offline", "lambada-offline, or wikitext-2 (needs the hub)")
    perplexity_tokens: int = param(8192, "tokens of perplexity text (0: skip perplexity)")
    perplexity_window: int = param(512, "sliding-window length; the stride is half of it")
    generation_tasks: list = param(help="generation quality on prompts no training run reads ([]: skipped, the "
                                   "default, since full-length outputs of every model cost more than the rest "
                                   "of a CPU evaluation): gsm8k, math, humaneval, mbpp, basic_skills_<arithmetic|"
                                   "string_operations|pattern|coding|common_knowledge>",
                                   default_factory=list)
    generation_split: str = param("test", "the prompts' slice: test (what a study reports) or validation (for "
                                  "tuning; disjoint from test)")
    generation_limit: int | None = param(8, "prompts per generation task, a seeded sample (None: the whole slice)")
    generation_max_new_tokens: int = param(384, "length cap of the full-length outputs (how many hit it is recorded)")
    generation_samples: int = param(1, "outputs sampled per prompt at generation_temperature, beside the greedy one")
    generation_temperature: float | None = param(None, "sampling temperature (None: each run's training temperature)")
    generation_batch_size: int = param(16, "prompts generated at once")
    generation_matmul: str = param("linear", "the generation's decode-step products: linear (F.linear) or packed "
                                   "(full-precision weights reordered once for oneDNN; equal within float rounding, "
                                   "faster on some CPUs: see docs/performance.md)")
    generation_seed: int = param(0, "seed of the prompt sample and of the sampled outputs (the same for every model)")
    offline: bool = param(True, "packaged benchmark data; False: lm-eval's stock hub tasks")
    device: str = param("auto", "auto, cpu or cuda", identity=False)
    dtype: str = param("auto", "compute dtype of every model evaluated: auto (float32 on CPU, bfloat16 on CUDA), "
                       "float32 or bfloat16 (on a CPU with AVX512-BF16 or AMX faster, and less exact; the "
                       "models are quantized as in training, then computed in it)")
    cuda_int4_kernels: bool = param(True, "on CUDA, evaluate int4 students and PTQ on torch's int4 kernels; False: "
                                    "on the weights those kernels read, as bf16 matmuls (much faster prefill)")
    # Teacher / PTQ scheme when evaluating baselines without runs; with runs they come from the
    # students, and a scheme given here must match theirs.
    model_name: str | None = param(None, "only when evaluating baselines without run_dirs")
    quant_type: str | None = param(None, "PTQ scheme without run_dirs (else the students')")
    group_size: int | None = param(None, "PTQ group size without run_dirs (else the students')")
    baselines_record: str | None = param(None, "without run_dirs: also write the baselines' results to this new "
                                         "JSON file (eval.json's format), where the analysis reads them",
                                         identity=False)
    cache_dir: str | None = param(None, "teacher/PTQ result cache (None: outputs/eval_cache)", identity=False)

    @classmethod
    def check_overrides(cls, overrides: dict[str, Any], where: str) -> None:
        """Refuse unknown or invalid EvalConfig overrides (as given to ``do_eval``), naming ``where``."""
        names = set(cls.field_names()) - {"run_dirs"}
        bad = sorted(set(overrides) - names)
        if bad:
            raise ConfigError(f"{where}: unknown parameter(s) {', '.join(bad)}; "
                              f"eval.ipynb parameters: {', '.join(sorted(names))}")
        try:  # the checks eval.ipynb makes on its own parameters; the model and scheme come from each run
            cls(**{**overrides, "run_dirs": [], "model_name": "placeholder", "include_teacher": True,
                   "include_ptq": False}).validate()
        except ConfigError as err:
            raise ConfigError(f"{where}: {err}") from None

    def validate(self) -> EvalConfig:
        # papermill's -p passes lists as strings ('["a", "b"]'); accept those and plain "a,b".
        self.run_dirs, self.tasks = _as_list(self.run_dirs), _as_list(self.tasks)
        self.tasks = check_tasks(self.tasks)
        self.calibrated = _as_list(self.calibrated)
        for method in self.calibrated:
            _check_choice("calibrated", method, CALIBRATED_METHODS)
        check_int("calibration_samples", self.calibration_samples)
        check_int("calibration_seed", self.calibration_seed, minimum=0)
        _check_choice("dtype", self.dtype, DTYPES)
        # lm-eval reads a float < 1 as a fraction; we only allow counts so results say what they evaluated.
        check_int("limit", self.limit, allow_none=True)
        if not isinstance(self.task_limits, dict):
            raise ConfigError(f"task_limits must be a mapping of benchmark -> documents, got {self.task_limits!r}")
        check_tasks(list(self.task_limits))
        for task, value in self.task_limits.items():
            check_int(f"task_limits[{task!r}]", value, allow_none=True)
        check_int("sample_seed", self.sample_seed, minimum=0)
        check_int("mmlu_limit", self.mmlu_limit, allow_none=True)
        check_int("num_fewshot", self.num_fewshot, minimum=0, allow_none=True)
        check_int("batch_size", self.batch_size)
        check_int("perplexity_window", self.perplexity_window, minimum=2)
        check_int("fidelity_samples", self.fidelity_samples, minimum=0)
        check_int("perplexity_tokens", self.perplexity_tokens, minimum=0)
        for name in ("include_teacher", "include_ptq", "offline", "cuda_int4_kernels"):
            _check_bool(name, getattr(self, name))
        _check_choice("perplexity_source", self.perplexity_source, TEXT_SOURCES)
        self.generation_tasks = _as_list(self.generation_tasks)
        if self.generation_tasks:
            from onpolicy_lib.gen_tasks import GEN_TASKS  # reads no data

            for task in self.generation_tasks:
                _check_choice("generation_tasks", task, GEN_TASKS)
        _check_choice("generation_split", self.generation_split, ("validation", "test"))
        check_int("generation_limit", self.generation_limit, allow_none=True)
        check_int("generation_max_new_tokens", self.generation_max_new_tokens)
        check_int("generation_samples", self.generation_samples, minimum=0)
        _check_choice("generation_matmul", self.generation_matmul, ("linear", "packed"))
        if self.generation_temperature is not None and not (is_number(self.generation_temperature)
                                                            and self.generation_temperature > 0):
            raise ConfigError("generation_temperature must be a number > 0 or None, got "
                              f"{self.generation_temperature!r}")
        check_int("generation_batch_size", self.generation_batch_size)
        check_int("generation_seed", self.generation_seed, minimum=0)
        _check_choice("device", self.device, DEVICES)
        if self.quant_type is not None:
            _check_choice("quant_type", self.quant_type, QUANT_TYPES)
        check_int("group_size", self.group_size, allow_none=True)
        # Students' schemes are checked against these by evaluate.plan, which reads the run directories.
        self.run_dirs = [portable_path(resolve_path(r)) for r in self.run_dirs]
        if not self.run_dirs:
            if not (self.include_teacher or self.include_ptq):
                raise ConfigError("nothing to evaluate: run_dirs is empty and include_teacher/include_ptq are False")
            if self.model_name is None or (self.include_ptq and None in (self.quant_type, self.group_size)):
                raise ConfigError("without run_dirs, set model_name (and quant_type, group_size for include_ptq)")
        if self.baselines_record is not None:
            if self.run_dirs:
                raise ConfigError("baselines_record is for an evaluation without run_dirs (a run's baselines are "
                                  "recorded in its eval.json)")
            if not str(self.baselines_record).endswith(".json"):
                raise ConfigError(f"baselines_record must be a .json path, got {self.baselines_record!r}")
            if resolve_path(self.baselines_record).exists():
                raise ConfigError(f"baselines_record: {self.baselines_record} exists; delete it to evaluate again")
            self.baselines_record = portable_path(resolve_path(self.baselines_record))
        return self

    def benchmark_settings(self) -> dict[str, Any]:
        return {"tasks": self.tasks, "limit": self.limit, "mmlu_limit": self.mmlu_limit,
                "task_limits": self.task_limits, "sample_seed": self.sample_seed,
                "num_fewshot": self.num_fewshot, "batch_size": self.batch_size, "offline": self.offline}

    def generation_settings(self) -> dict[str, Any]:
        """What decides the generation prompts and outputs, less the temperature (a run's own by default)."""
        return {"tasks": self.generation_tasks, "split": self.generation_split, "limit": self.generation_limit,
                "max_new_tokens": self.generation_max_new_tokens, "samples": self.generation_samples,
                "seed": self.generation_seed, "batch_size": self.generation_batch_size,
                # Another kernel, equal within rounding: only a non-default choice enters the key.
                **({"matmul": self.generation_matmul} if self.generation_matmul != "linear" else {})}

    def perplexity_settings(self) -> dict[str, Any]:
        return {"perplexity_source": self.perplexity_source, "perplexity_tokens": self.perplexity_tokens,
                "perplexity_window": self.perplexity_window}


def _as_list(value: Any) -> list[str]:
    if isinstance(value, Path):
        return [str(value)]
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            return [str(v) for v in yaml.safe_load(text)]
        return [v.strip() for v in text.split(",") if v.strip()]
    return [str(v) for v in value]


# ---------------------------------------------------------------------------- names and paths
def short_name(values: dict[str, Any]) -> str:
    """``{"learning_rate": 5e-05, "lmbda": 1}`` -> ``lr-5e-05_lmbda-1``: a file-system-safe run name."""
    shorts = {f.name: f.metadata.get("short") for f in dataclasses.fields(TrainConfig)}
    name = "_".join(f"{shorts.get(k) or k}-{format_value(v, path_stem=True)}" for k, v in values.items())
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name)[:150]


def format_value(value: Any, path_stem: bool = False) -> str:
    """How a parameter value is shown in names and labels: ``5e-05``, ``1``, a path's last part."""
    if isinstance(value, str):
        return Path(value).name if path_stem and "/" in value else value
    return f"{value:g}" if isinstance(value, float) else str(value)


def _check_model_name(name: Any) -> None:
    # Accept the packaged alias, a local directory or .gguf file, or a hub-id-shaped string.
    # Hub ids are not looked up here: that would need the network before anything else ran.
    if isinstance(name, str) and name:
        if name in PACKAGED_MODELS:
            return
        if name.startswith("random:"):  # an architecture with random weights (onpolicy_lib.models)
            from onpolicy_lib.models import check_random_name

            try:
                check_random_name(name)
            except ValueError as err:
                raise ConfigError(str(err)) from None
            return
        path = Path(name).expanduser()
        if name.endswith(".gguf"):
            if path.is_file():
                return
            raise ConfigError(f"model_name: GGUF file {name!r} does not exist")
        if path.is_dir():
            if (path / "config.json").is_file():  # a model's file, not a run's
                return
            raise ConfigError(f"model_name: directory {name!r} has no config.json (not a HF model directory)")
        if re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", name) and not path.exists():
            return
    raise ConfigError(f"model_name must be a packaged alias ({', '.join(PACKAGED_MODELS)}), a hub id like "
                      f"'Qwen/Qwen3-4B-Instruct-2507', a local model directory, a .gguf file or "
                      f"random:<hub id>; got {name!r}")


def resolve_path(path: str | Path) -> Path:
    """Relative paths are relative to the project root, wherever the notebook kernel runs;
    ``assets:...`` is relative to the offline asset cache."""
    text = str(path)
    if text.startswith(ASSETS_PREFIX):
        return cache_dir() / text[len(ASSETS_PREFIX):]
    path = Path(text).expanduser()
    return path if path.is_absolute() else PROJECT_ROOT / path


def portable_path(path: str | Path) -> str:
    """How a path is recorded in outputs: relative to the project, ``assets:...`` in the asset
    cache, absolute only outside both, so a reader's clone never shows another machine's paths."""
    resolved = Path(path).expanduser().absolute()
    for root, prefix in ((PROJECT_ROOT, ""), (cache_dir().absolute(), ASSETS_PREFIX)):
        if resolved.is_relative_to(root):
            return prefix + str(resolved.relative_to(root))
    return str(path)


def portable_text(text: str) -> str:
    """``text`` with every absolute path under the project or the asset cache written as
    :func:`portable_path` writes it (for logs and rendered notebooks, which print paths freely)."""
    for root, prefix in ((cache_dir().absolute(), ASSETS_PREFIX), (PROJECT_ROOT, "")):
        text = text.replace(f"{root}/", prefix).replace(str(root), prefix or ".")
    return text


def outputs_root() -> Path:
    return PROJECT_ROOT / "outputs"


# ---------------------------------------------------------------------------- presets
def read_yaml(path: Path, error: type[ConfigError] = ConfigError) -> Any:
    """A YAML file's contents; a file that does not parse raises ``error`` in one line naming the file
    and the line and column where the parser stopped, not the parser's traceback."""
    try:
        return yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
        where = portable_path(path) + (f", line {mark.line + 1}, column {mark.column + 1}" if mark else "")
        problem = " ".join(str(getattr(err, "problem", None) or err).split())
        raise error(f"{where}: not valid YAML ({problem})") from None


def load_preset(name_or_path: str) -> dict[str, Any]:
    """Parameters from a YAML preset in ``params/`` (by stem) or at a path.

    A preset is a flat mapping of train.ipynb parameters that differ from the defaults, so
    papermill can take it as is (``-f params/qwen3_4b_study.yaml``). Only here, an optional
    ``base:`` key names another preset whose values it overrides.
    """
    path = Path(name_or_path)
    if not path.suffix:
        path = PARAMS_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        available = ", ".join(sorted(p.stem for p in PARAMS_DIR.glob("*.yaml")))
        raise ConfigError(f"preset {name_or_path!r} not found; available presets: {available}")
    values = read_yaml(path) or {}
    if not isinstance(values, dict):
        raise ConfigError(f"{portable_path(path)}: a preset is a mapping of train.ipynb parameters, got {values!r}")
    base = values.pop("base", None)
    merged = load_preset(base) if base else {}
    merged.update(values)
    TrainConfig.from_dict(merged)  # unknown keys fail here, naming them
    return merged


# ---------------------------------------------------------------------------- notebooks' parameters cells
NOTEBOOK_CONFIGS = {"train.ipynb": TrainConfig, "eval.ipynb": EvalConfig}
CELL_HEADER = ("# Parameters (papermill overrides this cell). Generated from onpolicy_lib.config.{cls}:\n"
               "# edit the dataclass, then run `python -m onpolicy_lib.config --write-notebooks`.\n")
_LINE = 120


def parameters_cell(cls: type[_Params]) -> str:
    """The ``parameters`` cell of the notebook driven by ``cls``: one assignment per field.

    Optional fields carry no annotation (papermill's parser does not read ``int | None`` and
    would report them as unknown parameters); their type is in the comment instead.
    """
    lines = [CELL_HEADER.format(cls=cls.__name__).rstrip("\n")]
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        type_name = str(f.type)
        optional = "|" in type_name  # a union (``int | None``, ``bool | str``): papermill reads no unions
        target = f.name if optional else f"{f.name}: {type_name}"
        help_text = f.metadata.get("help", "")
        if optional:
            help_text = f"{type_name.replace(' | ', ' or ')}; {help_text}"
        line = f"{target} = {default!r}"
        if len(line) + len(help_text) + 4 <= _LINE:
            lines.append(f"{line}  # {help_text}")
        else:
            lines += [f"# {text}" for text in textwrap.wrap(f"{f.name}: {help_text}", _LINE - 2)] + [line]
    return "\n".join(lines)


def notebook_parameters_source(notebook: Path) -> str:
    import nbformat

    nb = nbformat.read(notebook, as_version=4)
    cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    if len(cells) != 1:
        raise ValueError(f"{notebook}: expected one cell tagged 'parameters', found {len(cells)}")
    return cells[0].source


def write_notebook_parameters() -> list[Path]:
    """Regenerate each notebook's parameters cell from its dataclass; returns the notebooks changed."""
    import nbformat

    changed = []
    for name, cls in NOTEBOOK_CONFIGS.items():
        path = NOTEBOOKS_DIR / name
        nb = nbformat.read(path, as_version=4)
        cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
        source = parameters_cell(cls)
        if cell.source != source:
            cell.source = source
            nbformat.write(nb, path)
            changed.append(path)
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m onpolicy_lib.config", description=__doc__.split("\n\n")[0])
    parser.add_argument("--write-notebooks", action="store_true",
                        help="regenerate the notebooks' parameters cells from the dataclasses")
    parser.add_argument("--show", choices=sorted(NOTEBOOK_CONFIGS), help="print a notebook's parameters cell")
    args = parser.parse_args(argv)
    if args.write_notebooks:
        changed = write_notebook_parameters()
        print("updated: " + (", ".join(p.name for p in changed) if changed else "nothing (already in sync)"))
    if args.show:
        print(parameters_cell(NOTEBOOK_CONFIGS[args.show]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
