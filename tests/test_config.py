"""Bad input fails early, in one line naming the parameter; run names and presets."""

from __future__ import annotations

import json
import shutil
import time

import pytest

from onpolicy_lib import assets, config
from onpolicy_lib.config import ConfigError, TrainConfig, load_preset
from onpolicy_lib.rundir import Run


def offline(**overrides) -> TrainConfig:
    """A config that needs no offline assets (local model and dataset paths)."""
    return TrainConfig(**{"model_name": "org/model", "dataset_name": "org/data", **overrides})


@pytest.mark.parametrize(("overrides", "message"), [
    ({"lmbda": 1.5}, r"^lmbda must be a number in \[0, 1\], got 1.5$"),
    ({"lmbda": -0.1}, r"^lmbda must be a number in \[0, 1\]"),
    ({"beta": 2}, r"^beta must be a number in \[0, 1\]"),
    ({"beta": "0.5"}, r"^beta must be a number"),
    ({"quant_type": "fp8"}, r"^quant_type must be one of int4, int8, int3, int2; got 'fp8'$"),
    ({"group_size": 0}, r"^group_size must be a positive integer or None, got 0$"),
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
    ({"rollout_dtype": "float16"}, r"^rollout_dtype must be one of auto, float32, bfloat16; got 'float16'$"),
    ({"rollout_matmul": "fast"}, r"^rollout_matmul must be one of auto, linear, weight_major, packed; got 'fast'$"),
    ({"divergence": "kl"}, r"^divergence must be one of jsd, cakld; got 'kl'$"),
    ({"fsdp": "yes"}, r"^fsdp must be True or False"),
    ({"fsdp": True, "lora_r": 8}, r"^fsdp shards full fine-tuning; LoRA \(lora_r=8\) .* uses DDP"),
    ({"fsdp": True, "rollout_dtype": "bfloat16"}, r"^rollout_dtype must be float32 with fsdp"),
    ({"fsdp": True, "rollout_matmul": "weight_major"}, r"^rollout_matmul must be linear with fsdp"),
    ({"rollout_compile": "yes"}, r"^rollout_compile must be"),
    ({"rollout_compile": True, "lora_r": 8}, r"^rollout_compile needs a plain quantization-aware student .*lora_r=8"),
    ({"model_name": "no-such-model"}, r"^model_name must be a packaged alias \(smollm2-135m-instruct, gemma3-270m\)"),
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


def test_quant_types_are_declared_once():
    from onpolicy_lib import quantization, schemes

    assert config.QUANT_TYPES is quantization.QUANT_TYPES is schemes.QUANT_TYPES


def test_run_name_lists_non_default_parameters():
    assert TrainConfig().run_name() == "default"
    assert TrainConfig(lmbda=1.0, learning_rate=5e-5).run_name() == "lmbda-1_lr-5e-05"
    assert TrainConfig(model_name="Qwen/Qwen3-4B-Instruct-2507").run_name() == "model-Qwen3-4B-Instruct-2507"
    assert TrainConfig(lmbda=1).resolved_output_dir() == config.outputs_root() / "lmbda-1"


def test_presets_list_only_what_differs_from_the_defaults():
    defaults = TrainConfig().to_dict()
    for path in config.PARAMS_DIR.glob("*.yaml"):
        values = load_preset(str(path))
        same = sorted(k for k, v in values.items() if v == defaults[k])
        assert not same, f"{path.name} repeats defaults: {same}"


def test_presets_load_and_validate_names():
    study = TrainConfig(**load_preset("qwen3_4b_study"))
    study.validate()
    assert study.model_name == "Qwen/Qwen3-4B-Instruct-2507"
    assert study.dataset_name == "allenai/tulu-3-sft-mixture"
    with pytest.raises(ConfigError, match="preset 'nope' not found; available presets: "):
        load_preset("nope")


def test_preset_with_unknown_key_is_refused(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: qwen3_4b_study\nlambda: 1\n")
    with pytest.raises(ConfigError, match="unknown parameter"):
        load_preset(str(bad))
    good = tmp_path / "good.yaml"
    good.write_text("base: qwen3_4b_study\nlmbda: 1\n")
    assert load_preset(str(good))["lmbda"] == 1


def test_a_malformed_preset_names_its_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("lmbda: 1\nlearning_rate: [1e-4\nseed: 2\n")
    with pytest.raises(ConfigError, match=r"^\S*bad.yaml, line 3, column 5: not valid YAML \(.*\)$"):
        load_preset(str(bad))
    bad.write_text("- lmbda\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: a preset is a mapping of train.ipynb parameters"):
        load_preset(str(bad))


def test_a_corrupted_config_json_is_named_as_corrupted_and_nothing_is_touched(tmp_path):
    cfg = offline().to_dict()
    run = tmp_path / "run"
    run.mkdir()
    (run / "train_log.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    for text, problem in (('{"train": {"lmbda": 0.5', "not valid JSON"), ("[1, 2]", "not a run's configuration")):
        (run / "config.json").write_text(text)
        with pytest.raises(ConfigError, match=rf"^output_dir \S+: its config.json is corrupted \({problem}"):
            Run(run).plan(cfg)
        assert (run / "config.json").read_text() == text


def test_run_directory_states(tmp_path):
    cfg = offline().to_dict()
    assert Run(tmp_path / "fresh").plan(cfg).state == "new"
    rendered = tmp_path / "rendered"
    rendered.mkdir()
    (rendered / "train.ipynb").write_text("{}")
    assert Run(rendered).plan(cfg).state == "new"  # papermill's output notebook is not a run
    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not empty and holds no config.json"):
        Run(stray).plan(cfg)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"train": cfg}))
    for step in (2, 10, 20, 30):
        (run / f"checkpoint-{step}").mkdir()
    for step in (2, 10, 20):
        (run / f"checkpoint-{step}" / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    state = Run(run).plan({**cfg, "do_eval": True})  # do_eval does not change what is trained
    # The last checkpoint the Trainer finished writing, by step (10 after 2), not by name.
    assert state.state == "resume" and state.checkpoint.name == "checkpoint-20"
    assert state.describe().endswith("from checkpoint-20 (checkpoint-30 skipped: written only in part when the "
                                     "run stopped; overwritten as training passes it)")
    (run / "checkpoint-20" / "trainer_state.json").write_text('{"global_st')  # killed while writing it
    assert Run(run).plan(cfg).checkpoint.name == "checkpoint-10"
    (run / "checkpoint-20" / "trainer_state.json").write_text('{"global_step": 20}')
    shutil.rmtree(run / "checkpoint-30")
    assert Run(run).plan(cfg).describe().endswith("from checkpoint-20")
    (run / "metrics.json").write_text("{}")
    assert Run(run).plan(cfg).state == "complete"
    # Finished but never evaluated, and its student weights gone (they are not in git): refused up front.
    with pytest.raises(ConfigError, match="metrics but not its student weights"):
        Run(run).plan({**cfg, "do_eval": True})
    (run / "student").mkdir()
    (run / "student" / "quantization.json").write_text("{}")
    assert Run(run).plan({**cfg, "do_eval": True}).state == "complete"
    (run / "eval.json").write_text("{}")
    shutil.rmtree(run / "student")
    assert Run(run).plan({**cfg, "do_eval": True}).state == "complete"  # evaluated: nothing left to do
    with pytest.raises(ConfigError, match=r"different config \(max_steps: 60 -> 61\)"):
        Run(run).plan({**cfg, "max_steps": 61})


def test_identity_and_run_name_come_from_the_field_metadata():
    # Bookkeeping fields neither name a run nor change its identity.
    for bookkeeping in ({"save_steps": 10}, {"logging_steps": 5}, {"do_eval": True}, {"device": "cpu"},
                        {"eval_parameters": {"limit": 5}}):
        assert TrainConfig(**bookkeeping).run_name() == "default"
    assert "save_steps" not in TrainConfig.identity_fields() and "lmbda" in TrainConfig.identity_fields()
    assert TrainConfig(heldout_eval_size=8).run_name() == "heldout_eval_size-8"


def test_unknown_eval_parameters_are_refused_up_front():
    with pytest.raises(ConfigError, match=r"^eval_parameters: unknown parameter\(s\) perplexity_windw"):
        offline(do_eval=True, eval_parameters={"perplexity_windw": 256}).validate()
    with pytest.raises(ConfigError, match=r"^eval_parameters: limit must be"):
        offline(do_eval=True, eval_parameters={"limit": 0}).validate()
    offline(do_eval=True, eval_parameters={"perplexity_window": 256}).validate()


def test_portable_paths(tmp_path, monkeypatch):
    assert config.portable_path(config.PROJECT_ROOT / "outputs" / "x") == "outputs/x"
    monkeypatch.setenv(assets.CACHE_ENV, str(tmp_path / "cache"))
    assert config.portable_path(tmp_path / "cache" / "olmo_eval" / "d") == "assets:olmo_eval/d"
    assert config.resolve_path("assets:olmo_eval/d") == tmp_path / "cache" / "olmo_eval" / "d"
    assert config.resolve_path("outputs/x") == config.PROJECT_ROOT / "outputs" / "x"
    assert config.portable_path("/elsewhere/run") == "/elsewhere/run"


def test_run_lock_marks_a_run_running_while_held(tmp_path):
    run = Run(tmp_path / "run")
    assert run.status() == "pending"
    fd = run.claim()
    assert fd is not None and run.status() == "running"
    assert Run(tmp_path / "run").claim() is None  # a second claimer is refused
    run.release(fd)
    assert run.status() == "pending" and not run.file(run.LOCK).exists()


def test_portable_text_rewrites_paths_that_libraries_print(tmp_path, monkeypatch):
    monkeypatch.setenv(assets.CACHE_ENV, str(tmp_path / "cache"))
    root = config.PROJECT_ROOT
    text = (f"{root}/.venv/lib/python3.11/site-packages/trl/x.py:12: UserWarning: ...\n"
            f"cwd {root}\ndata {tmp_path}/cache/olmo_eval/hf_datasets\n")
    assert config.portable_text(text) == (".venv/lib/python3.11/site-packages/trl/x.py:12: UserWarning: ...\n"
                                          "cwd .\ndata assets:olmo_eval/hf_datasets\n")
