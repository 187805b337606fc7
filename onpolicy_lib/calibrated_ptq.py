"""Calibrated post-training baselines: GPTQ and AWQ, on the students' own grid or in the original's recipes.

They run in llmcompressor's own environment (it pins transformers and compressed-tensors versions
this project does not use): ``make baselines-env`` builds ``.venv-llmc``, and
:func:`calibrated_model` runs :mod:`onpolicy_lib.calibrated_ptq_runner` there on the teacher with a
calibration sample of the students' training chats, then this environment loads the plain checkpoint
it writes (its Linear weights are the quantized values) and evaluates it like the round-to-nearest
PTQ baseline. The result is cached by everything that determines it.

``gptq``/``awq`` quantize onto the students' grid (bit width, symmetry, group size, head policy) so
they compare with the distilled students; ``gptq-original``/``awq-original`` are the original study's
own recipes (llmcompressor ``W4A16`` / ``W4A16_ASYM`` presets: INT4 in groups of 128, head kept, AWQ
with ``duo_scaling="both"``, calibration chats up to 2048 tokens), whatever the students' scheme.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from onpolicy_lib.config import CALIBRATED_METHODS as METHODS

LABELS = {"gptq": "GPTQ", "awq": "AWQ"}
BITS = {"int8": 8, "int4": 4, "int3": 3, "int2": 2}
ORIGINAL_SUFFIX = "-original"
PYTHON_ENV = "ONPOLICY_QUANT_LLMC_PYTHON"
_ROOT = Path(__file__).resolve().parents[1]
_RUNNER = Path(__file__).with_name("calibrated_ptq_runner.py")


class CalibratedError(RuntimeError):
    """A calibrated baseline that cannot be built here."""


@dataclass(frozen=True)
class Recipe:
    """What one calibrated baseline does: the algorithm and the grid it quantizes onto."""

    algorithm: str  # gptq | awq
    bits: int
    group_size: int
    symmetric: bool
    quantize_head: bool
    duo_scaling: bool | str = True  # AWQ's scale search: activations and weights (True) or "both" halves
    calibration_length: int | None = None  # tokens per calibration chat; None: the students' max_length
    preset: str | None = None  # llmcompressor's scheme name, for the original's recipes

    @property
    def label(self) -> str:
        name = LABELS[self.algorithm]
        if self.preset:
            return f"{name} {self.preset} g{self.group_size} (original recipe)"
        return f"{name} int{self.bits} g{self.group_size}" + (" +head" if self.quantize_head else "")


# The original study's gptq_awq.py recipes (see ../shared/study/original-settings.md).
ORIGINAL_RECIPES = {
    "gptq" + ORIGINAL_SUFFIX: Recipe("gptq", 4, 128, True, False, calibration_length=2048, preset="W4A16"),
    "awq" + ORIGINAL_SUFFIX: Recipe("awq", 4, 128, False, False, duo_scaling="both", calibration_length=2048,
                                    preset="W4A16_ASYM"),
}


def recipe(method: str, quant_type: str, group_size: int, quantize_head: bool, symmetric: bool) -> Recipe:
    """``method``'s recipe beside students of the given scheme (the original's ignore the scheme)."""
    if method not in METHODS:
        raise CalibratedError(f"calibrated baseline must be one of {', '.join(METHODS)}; got {method!r}")
    if method in ORIGINAL_RECIPES:
        return ORIGINAL_RECIPES[method]
    return Recipe(method, BITS[quant_type], group_size, symmetric, quantize_head)


def check_recipe(model: Any, model_name: str, method: str, recipe: Recipe) -> None:
    """Refuse, before any calibration, a recipe whose groups do not divide the model's Linear widths."""
    from onpolicy_lib import quantization

    widths = sorted({mod.in_features for _, mod in quantization._quantizable_layers(model, recipe.quantize_head)})
    bad = [w for w in widths if w % recipe.group_size]
    if bad:
        raise CalibratedError(
            f"calibrated: {method} quantizes in groups of {recipe.group_size}, which do not divide "
            f"{model_name}'s Linear input widths {', '.join(map(str, bad))}; "
            f"use a students'-grid baseline ({', '.join(m for m in METHODS if m not in ORIGINAL_RECIPES)}) "
            "for this model")


def llmc_python() -> Path:
    """The Python of llmcompressor's environment (``$ONPOLICY_QUANT_LLMC_PYTHON`` or ``.venv-llmc``)."""
    path = Path(os.environ.get(PYTHON_ENV) or _ROOT / ".venv-llmc" / "bin" / "python")
    if not path.exists():
        raise CalibratedError(f"GPTQ/AWQ baselines need llmcompressor's own environment, not found at {path}: "
                              f"run `make baselines-env` (or set {PYTHON_ENV})")
    return path


def calibration_set(tokenizer: Any, dataset_name: str, max_length: int, min_completion_tokens: int,
                    samples: int, seed: int, out: Path) -> int:
    """A seeded sample of the training split's chats (prompt and completion, as distilled), saved for
    llmcompressor as ``input_ids``/``attention_mask``; returns its size."""
    from datasets import Dataset

    from onpolicy_lib.data import prepare_distillation_data

    train = prepare_distillation_data(dataset_name, tokenizer, max_length, min_completion_tokens).train
    rows = train.shuffle(seed=seed).select(range(min(samples, len(train))))
    ids = [(r["prompt_ids"] + r["completion_ids"])[:max_length] for r in rows]
    Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(x) for x in ids]}).save_to_disk(str(out))
    return len(ids)


def calibrated_model(cache_root: Path, model_name: str, recipe: Recipe, dataset_name: str, max_length: int,
                     min_completion_tokens: int, samples: int, seed: int) -> Path:
    """The checkpoint of ``recipe`` applied to ``model_name``, calibrated on ``samples`` training chats
    (up to the recipe's calibration length, else ``max_length`` tokens), built once under a lock."""
    length = recipe.calibration_length or max_length
    key = {"model_name": model_name, **asdict(recipe), "dataset_name": dataset_name, "max_length": length,
           "min_completion_tokens": min_completion_tokens, "samples": samples, "seed": seed}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    base = cache_root / "calibrated"
    method = recipe.algorithm + (ORIGINAL_SUFFIX if recipe.preset else "")
    out = base / f"{method}-{digest}"
    base.mkdir(parents=True, exist_ok=True)
    with open(base / f"{method}-{digest}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (out / "calibrated.json").exists():
            return out
        python = llmc_python()  # checked before any work
        from onpolicy_lib.models import load_model, load_tokenizer, resolve_model_source

        tokenizer = load_tokenizer(model_name)
        with tempfile.TemporaryDirectory() as tmp:
            source, kwargs = resolve_model_source(model_name)
            if kwargs:  # a GGUF file: hand llmcompressor the teacher as this library dequantizes it
                source = str(Path(tmp) / "teacher")
                load_model(model_name).save_pretrained(source)
                tokenizer.save_pretrained(source)
            calibration = Path(tmp) / "calibration"
            n = calibration_set(tokenizer, dataset_name, length, min_completion_tokens, samples, seed, calibration)
            command = [str(python), str(_RUNNER), "--model", source, "--calibration", str(calibration),
                       "--method", recipe.algorithm, "--bits", str(recipe.bits),
                       "--group-size", str(recipe.group_size), "--max-length", str(length),
                       "--duo-scaling", str(recipe.duo_scaling).lower(), "--out", str(out)]
            command += ["--quantize-head"] if recipe.quantize_head else []
            command += [] if recipe.symmetric else ["--asymmetric"]
            command += ["--preset", recipe.preset] if recipe.preset else []
            print(f"{recipe.label}: calibrating {model_name} on {n} training chats in llmcompressor's "
                  "environment ...", file=sys.stderr, flush=True)
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode:
                tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-15:])
                raise CalibratedError(f"{recipe.label} failed in llmcompressor's environment:\n{tail}")
        meta = json.loads((out / "calibrated.json").read_text())
        (out / "calibrated.json").write_text(json.dumps({**meta, "key": key}, indent=2))
    return out


def load_calibrated(path: Path, device: Any = "cpu", dtype: Any = None) -> Any:
    """The calibrated baseline as a plain model (its weights are the quantized values), computing in
    ``dtype`` (None: the device's default)."""
    import torch
    from transformers import AutoModelForCausalLM

    from onpolicy_lib.models import default_dtype

    device = torch.device(device)
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype or default_dtype(device)).to(device).eval()
