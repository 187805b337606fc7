"""The rollout options in one place: their forms, validity rules, identity and ``auto``'s choice."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_model

from onpolicy_lib import rollouts
from onpolicy_lib.config import ConfigError, TrainConfig
from onpolicy_lib.rollouts import AUTO, EXACT, RolloutForm

WM = RolloutForm(matmul="weight_major")
PK = RolloutForm(matmul="packed")
# The packed form is a candidate where this torch build has oneDNN (every x86 CPU wheel does).
EAGER = [EXACT, WM, PK] if rollouts.packed_available() else [EXACT, WM]
COMPILED = RolloutForm(compiled=True)
AUTO_ALL = {"rollout_dtype": AUTO, "rollout_matmul": AUTO, "rollout_compile": AUTO}
LONG = rollouts.COMPILE_MIN_DECODE_STEPS


def test_candidates_follow_the_rules():
    assert rollouts.candidates(AUTO_ALL, decode_steps=LONG) == [
        f for f in rollouts.FP32_FORMS if f.matmul != "packed" or rollouts.packed_available()]
    # Short runs cannot earn a compile back: not measured, not chosen.
    assert rollouts.candidates(AUTO_ALL, decode_steps=LONG - 1) == EAGER
    assert rollouts.candidates(AUTO_ALL, decode_steps=LONG, lora=True) == EAGER
    assert rollouts.candidates(AUTO_ALL, decode_steps=LONG, fsdp=True) == [EXACT]
    # An explicit value narrows auto's choice, or forces a form outright.
    assert rollouts.candidates({**AUTO_ALL, "rollout_matmul": "linear"}, decode_steps=LONG) == [EXACT, COMPILED]
    assert rollouts.candidates({**AUTO_ALL, "rollout_compile": True}, decode_steps=0) == [
        COMPILED, RolloutForm(matmul="weight_major", compiled=True)]
    forced = {"rollout_dtype": "bfloat16", "rollout_matmul": "linear", "rollout_compile": False}
    assert rollouts.candidates(forced, decode_steps=LONG) == [RolloutForm("bfloat16")]
    # bf16 is never one of auto's candidates.
    assert all(f.dtype == "float32" for f in rollouts.candidates(AUTO_ALL, decode_steps=LONG))


@pytest.mark.parametrize(("overrides", "message"), [
    ({"rollout_compile": "yes"}, r"^rollout_compile must be True, False or 'auto', got 'yes'$"),
    ({"rollout_matmul": "fast"}, r"^rollout_matmul must be one of auto, linear, weight_major, packed; got 'fast'$"),
    ({"fsdp": True, "rollout_matmul": "weight_major"}, r"^rollout_matmul must be linear with fsdp"),
    ({"fsdp": True, "rollout_matmul": "packed"}, r"^rollout_matmul must be linear with fsdp"),
    ({"rollout_matmul": "packed", "rollout_compile": True}, r"^rollout_matmul packed cannot be compiled"),
    ({"rollout_compile": True, "lora_r": 8}, r"^rollout_compile needs a plain .*lora_r=8"),
])
def test_config_refuses_what_cannot_run(overrides, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**overrides).validate()


def test_auto_is_valid_everywhere_and_keeps_the_default_run_name():
    TrainConfig(fsdp=True).validate()
    TrainConfig(lora_r=8).validate()
    assert TrainConfig().run_name() == "default"
    assert TrainConfig(rollout_matmul="weight_major").run_name() == "rollmm-weight_major"


def test_identity_treats_auto_as_any_fp32_form():
    from onpolicy_lib.rundir import config_diff

    auto = TrainConfig().to_dict()
    recorded = {**auto, "rollout_dtype": "float32", "rollout_matmul": "weight_major", "rollout_compile": True}
    assert config_diff(recorded, auto) == {} and config_diff(auto, recorded) == {}
    old = {k: v for k, v in auto.items() if not k.startswith("rollout_")}  # written before the options existed
    assert config_diff(old, auto) == {}
    assert config_diff(old, {**auto, "rollout_matmul": "linear"}) == {}
    assert config_diff(old, {**auto, "rollout_matmul": "weight_major"}) == {
        "rollout_matmul": ("linear", "weight_major")}
    # bf16 is another policy: never the same run as auto.
    assert config_diff({**auto, "rollout_dtype": "bfloat16"}, auto) == {"rollout_dtype": ("bfloat16", AUTO)}


def timings(exact=0.10, wm=0.05, compiled=0.03, compile_s=60.0, wm_diff=1e-6, pk=1.0):
    return {"fp32": {"decode_step_s": exact, "max_logit_diff": 0.0},
            "fp32_wm": {"decode_step_s": wm, "max_logit_diff": wm_diff},
            "fp32_pk": {"decode_step_s": pk, "max_logit_diff": 1e-6},
            "fp32_compiled": {"decode_step_s": compiled, "compile_s": compile_s, "max_logit_diff": 1e-6},
            "fp32_wm_compiled": {"decode_step_s": compiled * 2, "compile_s": compile_s, "max_logit_diff": 1e-6}}


def test_choose_never_picks_a_slower_or_inexact_form():
    forms = list(rollouts.FP32_FORMS)
    assert rollouts.choose(timings(), forms, 1000)[0] == WM  # the compile does not pay over 1000 steps
    assert rollouts.choose(timings(), forms, 100_000)[0] == COMPILED  # it does over 100,000
    slower = timings(wm=0.2, compiled=0.2)
    assert rollouts.choose(slower, forms, 100_000)[0] == EXACT
    form, why = rollouts.choose(timings(wm_diff=0.5), forms[:2], 1000)
    assert form == EXACT and "outside fp32 tolerance" in why


class FakeMeasure:
    def __init__(self, measured):
        self.measured, self.calls = measured, []

    def __call__(self, forms):
        self.calls.append([f.key for f in forms])
        return {f.key: self.measured[f.key] for f in forms}


def test_resolve_records_its_choice_and_reuses_the_cached_measurement(tmp_path):
    key = {"machine": "test cpu", "model": {"hidden_size": 8}, "rows": 2}
    measure = FakeMeasure(timings(wm=0.2))  # weight-major slower than exact here
    first = rollouts.resolve(AUTO_ALL, decode_steps=1000, key=key, measure=measure, cache_root=tmp_path)
    assert first["form"] == "fp32" and first["rollout_matmul"] == "linear" and first["rollout_compile"] is False
    assert first["measured"]["fp32_wm"]["decode_step_s"] == 0.2 and first["cached"] is False
    eager = [f.key for f in EAGER]
    assert measure.calls == [eager]
    again = rollouts.resolve(AUTO_ALL, decode_steps=1000, key=key, measure=measure, cache_root=tmp_path)
    assert measure.calls == [eager] and again["cached"] and again["form"] == "fp32"
    # A longer run also needs the compiled forms: only those are measured (with the exact baseline).
    longer = rollouts.resolve(AUTO_ALL, decode_steps=100_000, key=key, measure=measure, cache_root=tmp_path)
    assert measure.calls[-1] == ["fp32", "fp32_compiled", "fp32_wm_compiled"] and longer["form"] == "fp32_compiled"
    # Another machine (key) measures again.
    rollouts.resolve(AUTO_ALL, decode_steps=1000, key={**key, "machine": "other"}, measure=measure,
                     cache_root=tmp_path)
    assert len(measure.calls) == 3


def test_explicit_values_force_their_form_without_measuring(tmp_path):
    measure = FakeMeasure(timings())
    forced = {"rollout_dtype": "float32", "rollout_matmul": "weight_major", "rollout_compile": False}
    record = rollouts.resolve(forced, decode_steps=1000, key={}, measure=measure, cache_root=tmp_path)
    assert record["form"] == "fp32_wm" and record["why"] == "every option explicit" and not measure.calls
    none = rollouts.resolve(AUTO_ALL, decode_steps=0, key={}, measure=measure, cache_root=tmp_path)
    assert none["form"] == "fp32" and not measure.calls  # λ=0: no student rollouts to speed up


def test_measure_forms_times_each_form_and_checks_its_logits(tokenizer):
    from onpolicy_lib.quantization import prepare_qat

    teacher = make_model(len(tokenizer))
    student = prepare_qat(copy.deepcopy(teacher), "int4", 32).eval()
    probe = rollouts.DecodeProbe(rows=2, prompt_width=10, max_new_tokens=8, vocab_size=len(tokenizer), steps=3)
    forms = [*EAGER, COMPILED]
    measured = rollouts.measure_forms(forms, student, teacher, probe, backend=None)
    assert measured["fp32"]["max_logit_diff"] == 0.0
    for form in forms:
        assert measured[form.key]["decode_step_s"] > 0
        assert measured[form.key]["max_logit_diff"] < rollouts.FP32_LOGIT_TOLERANCE / 10, form
    assert "compile_s" in measured["fp32_compiled"]
    # A wrong form (another student's weights) is caught by the logit check.
    other = prepare_qat(make_model(len(tokenizer)), "int4", 32).eval()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.5)
    wrong = rollouts.measure_forms([EXACT, COMPILED], student, other, probe, backend=None)
    assert wrong["fp32_compiled"]["max_logit_diff"] > rollouts.FP32_LOGIT_TOLERANCE


def test_settle_measures_a_run_once_per_machine(tmp_path, tokenizer):
    from onpolicy_lib.quantization import prepare_qat

    teacher = make_model(len(tokenizer))
    student = prepare_qat(copy.deepcopy(teacher), "int4", 32).eval()
    cfg = TrainConfig(lmbda=1.0, max_steps=2, max_new_tokens=8, max_length=64, per_device_train_batch_size=2)
    record = rollouts.settle(cfg, student, teacher, 20, "test cpu", cache_root=tmp_path, backend=None)
    eager = [f.key for f in EAGER]
    assert record["form"] in eager and record["candidates"] == eager
    assert set(record["measured"]) == set(eager) and not record["cached"]
    assert rollouts.settle(cfg, student, teacher, 25, "test cpu", cache_root=tmp_path)["cached"]


def test_a_run_records_its_form_and_a_resumed_run_keeps_it(tmp_path, tiny_model_dir, tiny_dataset_dir, monkeypatch):
    import json

    from onpolicy_lib.training import train

    cfg = TrainConfig(model_name=str(tiny_model_dir), dataset_name=str(tiny_dataset_dir), group_size=32, max_steps=2,
                      max_length=96, max_new_tokens=6, min_completion_tokens=4, lmbda=1.0, save_steps=1,
                      heldout_eval_size=4, output_dir=str(tmp_path / "run"), device="cpu")
    measured = FakeMeasure(timings(wm=0.01))  # weight-major measured faster: chosen
    monkeypatch.setattr(rollouts, "measure_forms", lambda forms, *a, **k: measured(forms))
    # A cache of its own: another test's run of the same shape may have cached a real measurement.
    monkeypatch.setenv(rollouts.SPEED_CACHE_ENV, str(tmp_path / "speed"))
    train(cfg)
    record = json.loads((tmp_path / "run" / "config.json").read_text())
    assert record["train"]["rollout_matmul"] == AUTO  # the run's parameters stay as asked (its name too)
    chosen = record["resolved"]["rollout"]
    assert chosen["form"] == "fp32_wm" and chosen["rollout_matmul"] == "weight_major"
    assert chosen["measured"]["fp32"]["decode_step_s"] == 0.10 and measured.calls == [[f.key for f in EAGER]]
    # Resumed (here: its metrics removed), the run keeps its recorded form without measuring, even where a
    # new measurement would now choose otherwise.
    (tmp_path / "run" / "metrics.json").unlink()
    measured.measured = timings(wm=1.0)
    train(cfg)
    record = json.loads((tmp_path / "run" / "config.json").read_text())
    assert record["resolved"]["rollout"]["form"] == "fp32_wm" and len(measured.calls) == 1


def test_auto_keeps_the_exact_form_on_an_accelerator():
    cfg = TrainConfig(lmbda=1.0)
    record = rollouts.settle(cfg, None, None, 10, "gpu", device="cuda")
    assert record["form"] == "fp32" and "CPUs only" in record["why"]
    forced = TrainConfig(lmbda=1.0, rollout_matmul="weight_major")
    assert rollouts.settle(forced, None, None, 10, "gpu", device="cuda")["form"] == "fp32_wm"
