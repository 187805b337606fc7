"""GPTQ and AWQ baselines: built in llmcompressor's own environment, on the students' grid, evaluated here.

They need that environment (``make baselines-env``, which ``make test`` builds); on a tiny model each
calibration takes about a second.
"""

from __future__ import annotations

import json

import pytest
import torch

from onpolicy_lib import calibrated_ptq, quantization
from onpolicy_lib.config import EvalConfig, TrainConfig
from onpolicy_lib.evaluate import evaluate_runs
from onpolicy_lib.models import load_model
from onpolicy_lib.training import train
from tests.conftest import make_model, tiny_run

GROUP = 32


@pytest.fixture
def llmc_env():
    try:
        calibrated_ptq.llmc_python()
    except calibrated_ptq.CalibratedError as err:
        pytest.skip(str(err))


def test_a_missing_environment_is_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv(calibrated_ptq.PYTHON_ENV, str(tmp_path / "nowhere" / "python"))
    with pytest.raises(calibrated_ptq.CalibratedError, match=r"run `make baselines-env`"):
        calibrated_ptq.llmc_python()


@pytest.mark.slow
@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_baseline_is_on_the_students_grid_and_cached(llmc_env, tmp_path, tiny_model_dir, tiny_dataset_dir, method):
    recipe = calibrated_ptq.recipe(method, "int4", GROUP, False, True)
    args = (tmp_path, str(tiny_model_dir), recipe, str(tiny_dataset_dir), 96, 4, 8, 0)
    path = calibrated_ptq.calibrated_model(*args)
    meta = json.loads((path / "calibrated.json").read_text())
    assert (meta["method"], meta["bits"], meta["group_size"], meta["symmetric"]) == (method, 4, GROUP, True)
    assert meta["calibration_samples"] == 8 and meta["baked_weights"] > 0
    model, teacher = calibrated_ptq.load_calibrated(path), load_model(str(tiny_model_dir))
    layers = dict(quantization._quantizable_layers(teacher))
    for name, module in model.named_modules():
        if name in layers:  # each group of 32 takes at most 16 values, and they moved off the teacher's
            groups = module.weight.detach().reshape(-1, GROUP)
            assert max(len(torch.unique(g)) for g in groups) <= 16, name
            assert not torch.equal(module.weight, layers[name].weight), name
    # The head (not quantized, as the students' default) and the embeddings are the teacher's.
    assert torch.equal(model.lm_head.weight, teacher.lm_head.weight)
    assert torch.equal(model.get_input_embeddings().weight, teacher.get_input_embeddings().weight)
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert calibrated_ptq.calibrated_model(*args) == path and (path / "model.safetensors").stat().st_mtime_ns == stamp


@pytest.mark.slow
def test_evaluated_beside_the_students(llmc_env, tmp_path, tiny_model_dir, tiny_dataset_dir, monkeypatch):
    run = train(TrainConfig(**tiny_run(tiny_model_dir, tiny_dataset_dir, group_size=GROUP, lmbda=0.0,
                                       output_dir=str(tmp_path / "run")))).path
    table = evaluate_runs(EvalConfig(run_dirs=[str(run)], tasks=[], perplexity_tokens=0, fidelity_samples=3,
                                     calibrated=["gptq", "awq"], calibration_samples=8,
                                     cache_dir=str(tmp_path / "cache"), device="cpu"))
    rows = table.set_index("model")
    for label in ("GPTQ int4 g32", "AWQ int4 g32"):
        assert rows.loc[label, "forward_kl"] > 0, label
    record = json.loads((run / "eval.json").read_text())
    assert {"teacher", "ptq", "gptq", "awq"} <= set(record["baselines"])
    assert record["baselines"]["gptq"]["calibrated"]["method"] == "gptq"
    # Without students (a PTQ-only rung), GPTQ is judged on a default run's chats: with those
    # settings equal to this run's, the cached calibration and fidelity give the same numbers.
    import onpolicy_lib.evaluate as evaluate

    settings = dict(dataset_name=str(tiny_dataset_dir), max_length=96, max_new_tokens=6, min_completion_tokens=4)
    monkeypatch.setattr(evaluate, "TrainConfig", lambda **kw: TrainConfig(**{**settings, **kw}))
    alone = evaluate_runs(EvalConfig(run_dirs=[], model_name=str(tiny_model_dir), quant_type="int4", group_size=GROUP,
                                     tasks=[], perplexity_tokens=0, fidelity_samples=3, calibrated=["gptq"],
                                     calibration_samples=8, cache_dir=str(tmp_path / "cache"), device="cpu"))
    assert alone.set_index("model").loc["GPTQ int4 g32", "forward_kl"] == rows.loc["GPTQ int4 g32", "forward_kl"]


def _group_codes(weight: torch.Tensor, group: int) -> int:
    return max(len(torch.unique(g)) for g in weight.detach().reshape(-1, group))


@pytest.mark.slow
@pytest.mark.parametrize("method,symmetric,preset", [("gptq-original", True, "W4A16"),
                                                     ("awq-original", False, "W4A16_ASYM")])
def test_the_original_recipes_use_its_presets(llmc_env, tmp_path, tokenizer, tiny_dataset_dir, method, symmetric,
                                              preset):
    model_dir = tmp_path / "wide"  # Linear widths 128 and 256: groups of 128 divide them
    make_model(len(tokenizer), hidden=128).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    recipe = calibrated_ptq.recipe(method, "int2", 32, True, True)  # the students' scheme does not matter
    assert (recipe.bits, recipe.group_size, recipe.symmetric, recipe.quantize_head, recipe.preset) == (
        4, 128, symmetric, False, preset)
    assert recipe.label.endswith(f"{preset} g128 (original recipe)")
    path = calibrated_ptq.calibrated_model(tmp_path / "cache", str(model_dir), recipe, str(tiny_dataset_dir), 96,
                                           4, 8, 0)
    meta = json.loads((path / "calibrated.json").read_text())
    assert (meta["preset"], meta["group_size"], meta["max_length"]) == (preset, 128, 2048)
    assert meta["duo_scaling"] == ("both" if method == "awq-original" else None)
    model, teacher = calibrated_ptq.load_calibrated(path), load_model(str(model_dir))
    for name, module in quantization._quantizable_layers(teacher):
        baked = model.get_submodule(name).weight
        assert _group_codes(baked, 128) <= 16 and not torch.equal(baked, module.weight), name
    assert torch.equal(model.lm_head.weight, teacher.lm_head.weight)  # the original ignores the head


def test_a_recipe_whose_groups_do_not_divide_the_model_is_refused_before_the_teacher_loads(
        tmp_path, tiny_model_dir, monkeypatch):
    import onpolicy_lib.evaluate as evaluate

    monkeypatch.setattr(evaluate, "load_model", lambda *a, **k: pytest.fail("the teacher was loaded"))
    cfg = EvalConfig(run_dirs=[], model_name=str(tiny_model_dir), quant_type="int4", group_size=GROUP, tasks=[],
                     perplexity_tokens=0, fidelity_samples=0, calibrated=["awq-original"],
                     cache_dir=str(tmp_path / "cache"), device="cpu")
    with pytest.raises(calibrated_ptq.CalibratedError,
                       match=r"^calibrated: awq-original quantizes in groups of 128, which do not divide .*"
                             r"Linear input widths 64; use a students'-grid baseline \(gptq, awq\)"):
        evaluate_runs(cfg)


@pytest.mark.slow
@pytest.mark.parametrize("method,quant_type", [("gptq", "int2"), ("awq", "int3"), ("gptq", "int8")])
def test_the_ladders_rungs_on_gemma(llmc_env, tmp_path, tiny_gemma_dir, tiny_dataset_dir, method, quant_type):
    """The CPU ladder's baselines: Gemma-3 (sliding and full attention, one KV head) at the low and high
    rungs, each group on its bit width's grid (at most 2**bits values), the head and embedding untouched."""
    bits = calibrated_ptq.BITS[quant_type]
    recipe = calibrated_ptq.recipe(method, quant_type, GROUP, False, True)
    path = calibrated_ptq.calibrated_model(tmp_path, str(tiny_gemma_dir), recipe, str(tiny_dataset_dir), 96, 4, 8, 0)
    meta = json.loads((path / "calibrated.json").read_text())
    assert (meta["method"], meta["bits"]) == (method, bits) and meta["baked_weights"] > 0
    model, teacher = calibrated_ptq.load_calibrated(path), load_model(str(tiny_gemma_dir))
    layers = dict(quantization._quantizable_layers(teacher))
    assert layers
    for name, module in model.named_modules():
        if name in layers:
            groups = module.weight.detach().reshape(-1, GROUP)
            assert max(len(torch.unique(g)) for g in groups) <= 2**bits, name
    assert torch.equal(model.get_input_embeddings().weight, teacher.get_input_embeddings().weight)


def test_one_calibration_per_scheme_whatever_the_students_seeds():
    from onpolicy_lib.evaluate import _calibration

    scheme = {"quant_type": "int4", "group_size": GROUP, "quantize_head": False}
    members = {seed: [(None, {**TrainConfig(seed=seed).to_dict()}, scheme)] for seed in (1, 2)}
    key = ("int4", GROUP, False)
    cfg = EvalConfig(run_dirs=[], calibration_samples=8)
    assert _calibration(cfg, members[1], key) == _calibration(cfg, members[2], key)
    assert _calibration(cfg, members[1], key)["seed"] == 0
    assert _calibration(EvalConfig(run_dirs=[], calibration_seed=3), members[1], key)["seed"] == 3
    with pytest.raises(Exception, match="calibration_seed must be a non-negative integer"):
        EvalConfig(run_dirs=[], calibration_seed=-1).validate()


def test_a_missing_llmcompressor_environment_is_refused_before_training(tmp_path, tiny_model_dir, tiny_dataset_dir,
                                                                        monkeypatch):
    import yaml

    from onpolicy_lib import sweep

    monkeypatch.setenv(calibrated_ptq.PYTHON_ENV, str(tmp_path / "missing" / "python"))
    cfg = TrainConfig(model_name=str(tiny_model_dir), dataset_name=str(tiny_dataset_dir), group_size=GROUP, max_steps=2,
                      max_length=96, max_new_tokens=6, min_completion_tokens=4, output_dir=str(tmp_path / "run"),
                      device="cpu", do_eval=True, eval_parameters={"tasks": [], "calibrated": ["gptq"]})
    with pytest.raises(calibrated_ptq.CalibratedError, match="llmcompressor's own environment, not found"):
        train(cfg)
    assert not (tmp_path / "run" / "train_log.jsonl").exists()
    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump({"params": {k: v for k, v in cfg.to_dict().items()
                                               if k in ("model_name", "dataset_name", "group_size", "max_steps",
                                                        "max_length", "device")},
                                    "eval": True, "eval_parameters": {"tasks": [], "calibrated": ["awq"]}}))
    with pytest.raises(sweep.SweepError, match=r"s: eval_parameters.calibrated: GPTQ/AWQ baselines need"):
        sweep.run_sweep(sweep.expand(spec, tmp_path / "out"))
    assert not (tmp_path / "out" / "s").exists() or not any((tmp_path / "out" / "s").rglob("config.json"))
    import onpolicy_lib.evaluate as evaluate

    monkeypatch.setattr(evaluate, "load_model", lambda *a, **k: pytest.fail("the teacher was loaded"))
    with pytest.raises(calibrated_ptq.CalibratedError, match="llmcompressor's own environment, not found"):
        evaluate_runs(EvalConfig(run_dirs=[], model_name=str(tiny_model_dir), quant_type="int4", group_size=GROUP,
                                 tasks=[], calibrated=["gptq"], cache_dir=str(tmp_path / "cache"), device="cpu"))
