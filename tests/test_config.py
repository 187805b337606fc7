"""Bad input fails early, in one line naming the parameter; run names and presets."""

from __future__ import annotations

import json
import time

import pytest

from onpolicy_lib import assets, config
from onpolicy_lib.config import ConfigError, TrainConfig, load_preset
from onpolicy_lib.rundir import prepare_run_dir


def offline(**overrides) -> TrainConfig:
    """A config that needs no offline assets (local model and dataset paths)."""
    return TrainConfig(**{"model_name": "org/model", "dataset_name": "org/data", **overrides})


@pytest.mark.parametrize(("overrides", "message"), [
    ({"lmbda": 1.5}, r"^lmbda must be a number in \[0, 1\], got 1.5$"),
    ({"lmbda": -0.1}, r"^lmbda must be a number in \[0, 1\]"),
    ({"beta": 2}, r"^beta must be a number in \[0, 1\]"),
    ({"beta": "0.5"}, r"^beta must be a number"),
    ({"quant_type": "fp8"}, r"^quant_type must be one of int4, int8, int3, int2; got 'fp8'$"),
    ({"group_size": 0}, r"^group_size must be a positive integer, got 0$"),
    ({"per_device_train_batch_size": 0}, r"^per_device_train_batch_size must be a positive integer"),
    ({"max_steps": -1}, r"^max_steps must be a positive integer"),
    ({"max_length": 0}, r"^max_length must be a positive integer"),
    ({"max_new_tokens": 0}, r"^max_new_tokens must be a positive integer"),
    ({"max_new_tokens": 300, "max_length": 256}, r"^max_new_tokens must be smaller than max_length=256"),
    ({"min_new_tokens": 40}, r"^min_new_tokens must be an integer in \[0, max_new_tokens=32\]"),
    ({"lora_r": 0}, r"^lora_r must be a positive integer"),
    ({"learning_rate": 0}, r"^learning_rate must be a positive number"),
    ({"temperature": -1.0}, r"^temperature must be a positive number"),
    ({"warmup_ratio": 1.0}, r"^warmup_ratio must be a number in \[0, 1\)"),
    ({"seq_kd": "yes"}, r"^seq_kd must be True or False"),
    ({"device": "tpu"}, r"^device must be one of auto, cpu, cuda"),
    ({"model_name": "no-such-model"}, r"^model_name must be 'smollm2-135m-instruct', a hub id"),
    ({"model_name": "/nowhere/model.gguf"}, r"^model_name: GGUF file '/nowhere/model.gguf' does not exist"),
    ({"dataset_name": "nonsense"}, r"dataset_name"),
])
def test_bad_values_are_rejected_with_the_parameter_named(overrides, message):
    with pytest.raises(ConfigError, match=message) as err:
        offline(**overrides).validate()
    assert "\n" not in str(err.value)


def test_validation_is_instant_and_accepts_good_values(tmp_path):
    start = time.perf_counter()
    offline(lmbda=1, beta=0, lora_r=8, group_size=32).validate()
    assert time.perf_counter() - start < 2.0


def test_model_directory_without_config_is_rejected(tmp_path):
    with pytest.raises(ConfigError, match="has no config.json"):
        offline(model_name=str(tmp_path)).validate()


def test_missing_assets_name_the_setup_command(tmp_path, monkeypatch):
    monkeypatch.setenv(assets.CACHE_ENV, str(tmp_path / "empty-cache"))
    with pytest.raises(assets.AssetsMissingError, match="python -m onpolicy_lib.assets"):
        TrainConfig().validate()


def test_quant_types_mirror_the_quantization_module():
    from onpolicy_lib import quantization

    assert config.QUANT_TYPES == quantization.QUANT_TYPES


def test_run_name_lists_non_default_parameters():
    assert TrainConfig().run_name() == "default"
    assert TrainConfig(lmbda=1.0, learning_rate=5e-5).run_name() == "lmbda-1_lr-5e-05"
    assert TrainConfig(model_name="Qwen/Qwen3-4B-Instruct-2507").run_name() == "model-Qwen3-4B-Instruct-2507"
    assert TrainConfig(lmbda=1).resolved_output_dir() == config.outputs_root() / "lmbda-1"


def test_presets_load_and_validate_names():
    demo = load_preset("cpu_demo")
    # The CPU demo preset spells out the notebook defaults.
    defaults = TrainConfig().to_dict()
    assert demo == {k: defaults[k] for k in demo}
    study = TrainConfig(**load_preset("qwen3_4b_study"))
    study.validate()
    assert study.model_name == "Qwen/Qwen3-4B-Instruct-2507"
    assert study.dataset_name == "allenai/tulu-3-sft-mixture"
    with pytest.raises(ConfigError, match="preset 'nope' not found; available presets: "):
        load_preset("nope")


def test_preset_with_unknown_key_is_refused(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: cpu_demo\nlambda: 1\n")
    with pytest.raises(ConfigError, match="unknown parameter"):
        load_preset(str(bad))
    good = tmp_path / "good.yaml"
    good.write_text("base: cpu_demo\nlmbda: 1\n")
    assert load_preset(str(good))["lmbda"] == 1


def test_run_directory_states(tmp_path):
    cfg = offline().to_dict()
    assert prepare_run_dir(tmp_path / "fresh", cfg).state == "new"
    rendered = tmp_path / "rendered"
    rendered.mkdir()
    (rendered / "train.ipynb").write_text("{}")
    assert prepare_run_dir(rendered, cfg).state == "new"  # papermill's output notebook is not a run
    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not empty and holds no config.json"):
        prepare_run_dir(stray, cfg)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"train": cfg}))
    (run / "checkpoint-10").mkdir()
    (run / "checkpoint-20").mkdir()
    state = prepare_run_dir(run, {**cfg, "do_eval": True})  # do_eval does not change what is trained
    assert state.state == "resume" and state.checkpoint.name == "checkpoint-20"
    (run / "metrics.json").write_text("{}")
    assert prepare_run_dir(run, cfg).state == "complete"
    with pytest.raises(ConfigError, match=r"different config \(max_steps: 60 -> 61\)"):
        prepare_run_dir(run, {**cfg, "max_steps": 61})
