"""The Qwen preset and sweeps against the original study's settings, value for value.

``onpolicy_lib/reference/original_settings.md`` is a copy of the facts read from the original's code
(``../shared/study/original-settings.md``); these tests parse that file, so a change on either side
that breaks faithfulness fails here, and every deliberate difference is listed with its reason.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

import onpolicy_lib
from onpolicy_lib import sweep
from onpolicy_lib.config import TrainConfig, load_preset

REFERENCE = Path(onpolicy_lib.__file__).parent / "reference" / "original_settings.md"
SHARED = Path(onpolicy_lib.__file__).resolve().parents[2] / "shared" / "study" / "original-settings.md"


def section(title: str) -> str:
    return REFERENCE.read_text().split(f"## {title}")[1].split("\n## ")[0]


def value(text: str):
    loaded = yaml.safe_load(text)
    try:  # YAML reads 1e-5 (no dot) as a string
        return float(loaded) if isinstance(loaded, str) else loaded
    except ValueError:
        return loaded


def original_defaults() -> dict:
    text = section("Training defaults")
    facts = {name: value(v) for name, v in re.findall(r"`(\w+)=([^`\s]+)`", text)}
    facts["lora_alpha"] = int(re.search(r"`lora_alpha = 2 \* lora_r` \((\d+)\)", text).group(1))
    facts["model_name"] = re.search(r"\| model \| `([^`]+)`", text).group(1)
    facts["dataset_name"] = re.search(r"\| dataset \| `([^`]+)`", text).group(1)
    facts["group_size"] = int(re.search(r"group size (\d+)", text).group(1))
    facts["temperature"] = float(re.search(r"GKDConfig` default \(([\d.]+)\)", text).group(1))
    facts["quantize_head"] = "so `lm_head` is fake-quantized too" in text
    facts["gpus"] = int(re.search(r"\*\*(\d+) GPUs by default\*\*", text).group(1))
    facts["headline_steps"] = int(re.search(r"headline runs: (\d+)k", text).group(1)) * 1000
    return facts


# Where the preset deliberately differs from the original's code defaults, and why.
DIFFERENCES = {
    "max_steps": "the README's headline runs (10k); the code default (1k) is the qwen_extended sweep's short arm",
    "gradient_accumulation_steps": "the original's global batch (4 x 2 x 8 GPUs) on one GPU: 4 x 16",
}
NOT_PARAMETERS = {
    "gradient_checkpointing": False,  # we never checkpoint by default either
}


def test_the_reference_copy_is_the_shared_file():
    if not SHARED.is_file():
        pytest.skip("../shared/study/ is not beside this checkout")
    assert REFERENCE.read_text() == SHARED.read_text()


def test_preset_matches_the_original_value_for_value():
    facts = original_defaults()
    preset = TrainConfig(**load_preset("qwen3_4b_study"))
    checked = 0
    for name, fact in facts.items():
        if name in NOT_PARAMETERS:
            assert fact == NOT_PARAMETERS[name], name
            continue
        if name in DIFFERENCES or not hasattr(preset, name):
            continue
        assert getattr(preset, name) == fact, f"{name}: preset {getattr(preset, name)!r}, original {fact!r}"
        checked += 1
    assert checked >= 18  # every row of the table that is a parameter of ours
    assert preset.max_steps == facts["headline_steps"]
    global_batch = facts["per_device_train_batch_size"] * facts["gradient_accumulation_steps"] * facts["gpus"]
    assert preset.per_device_train_batch_size * preset.gradient_accumulation_steps == global_batch == 64
    assert preset.quant_type == "int4" and preset.lora_r is not None  # LoRA on by default, INT4
    assert facts["quantize_head"] and preset.quantize_head
    assert preset.min_completion_tokens == int(re.search(r"min_response_tokens=(\d+)", section("Data filter")
                                                         ).group(1))


def expand(name: str) -> list[dict]:
    return [run.params for run in sweep.expand(sweep.find_spec(name), check_models=False).runs]


def tuned() -> list[dict]:
    lines = re.findall(r"`lmbda=([\d.]+), beta=([\d.]+), learning_rate=([\de.-]+)`", section("Tuned configurations"))
    return [{"lmbda": float(a), "beta": float(b), "learning_rate": float(c)} for a, b, c in lines]


def pick(params: dict, keys) -> dict:
    return {k: float(params[k]) for k in keys}


def test_tuned_configurations_and_sweep_ranges():
    configs = tuned()
    assert len(configs) == 2
    keys = ("lmbda", "beta", "learning_rate")
    assert [pick(p, keys) for p in expand("qwen_tuned")] == configs
    assert all(p["max_steps"] == 10000 for p in expand("qwen_tuned"))
    text = section("Sweeps")
    betas, lmbdas = (sorted(float(x) for x in re.search(rf"{g} ∈ \{{([^}}]+)\}}", text).group(1).split(","))
                     for g in ("β", "λ"))
    grid = {(p["beta"], p["lmbda"]) for p in expand("qwen_beta")}
    assert grid == {(b, la) for b in betas for la in lmbdas}
    rates = sorted(float(x) for x in re.search(r"learning rate: \{([^}]+)\}", text).group(1).split(","))
    lr_runs = expand("qwen_lr")
    for config in configs:
        arm = [p for p in lr_runs if (p["lmbda"], p["beta"]) == (config["lmbda"], config["beta"])]
        assert sorted(p["learning_rate"] for p in arm) == rates
    ranks = [int(x) for x in re.search(r"LoRA rank: \{([^}]+)\}", text).group(1).split(",")]
    rank_runs = expand("qwen_lora_rank")
    assert [p["lora_r"] for p in rank_runs] == ranks
    assert all(p["lora_alpha"] == 2 * p["lora_r"] for p in rank_runs)
    off_policy = next(c for c in configs if c["lmbda"] == 0)
    assert all(pick(p, keys) == off_policy for p in rank_runs)


def test_evaluation_settings_match():
    text = section("Evaluation (`eval.py`)")
    window, stride = map(int, re.search(r"window (\d+) tokens, stride (\d+)", text).groups())
    spec = sweep.read_spec(sweep.find_spec("qwen_tuned"))
    ev = spec["eval_parameters"]
    assert ev["perplexity_source"] == "wikitext-2" and ev["perplexity_window"] == window == 2 * stride
    assert ev["limit"] is None and ev["mmlu_limit"] is None and ev.get("num_fewshot") is None  # full, zero-shot
