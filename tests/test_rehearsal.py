"""The GPU rehearsal (``python -m onpolicy_lib.speed.rehearsal``): its stand-in model, its CPU run at the tiny
shape, the study's cost estimated from a hand-made report, and its reports never overwritten."""

from __future__ import annotations

import json
import math

import pytest
from conftest import chat_rows, make_tokenizer

from onpolicy_lib.config import ConfigError, _check_model_name
from onpolicy_lib.speed import rehearsal

QWEN = "random:Qwen/Qwen3-4B-Instruct-2507"


def test_random_model_names_are_validated_in_one_line():
    _check_model_name(QWEN)
    with pytest.raises(ConfigError, match=r"random weights are available for random:Qwen/Qwen3-4B") as err:
        _check_model_name("random:Qwen/Qwen3-8B")
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="model_name"):
        _check_model_name("random:")


def test_the_stand_in_has_the_committed_architecture():
    from importlib.resources import files

    from onpolicy_lib.models import load_skeleton, random_config

    committed = json.loads(files("onpolicy_lib.reference").joinpath("qwen3_4b_instruct_2507_config.json").read_text())
    config = random_config(QWEN)
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                "intermediate_size", "vocab_size", "tie_word_embeddings"):
        assert getattr(config, key) == committed[key], key
    skeleton = load_skeleton(QWEN)  # meta device: no memory
    assert type(skeleton).__name__ == "Qwen3ForCausalLM"
    assert 4.0e9 < sum(p.numel() for p in skeleton.parameters()) < 4.1e9  # "4.0B parameters" (its model card)


def test_random_weights_are_a_fixed_function_of_the_name():
    import torch

    from onpolicy_lib.models import build_random_model

    tiny = dict(rehearsal.SHAPES["tiny"]["model"], vocab_size=64, bos_token_id=None, eos_token_id=3, pad_token_id=0)
    a, b = (build_random_model(QWEN, "cpu", torch.float32, **tiny) for _ in range(2))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def hand_made_report() -> dict:
    student = {"loglikelihood": {t: {"docs_per_s": 10.0} for t in rehearsal.FULL_SPLITS},
               "generation": {"tokens_per_s": 100.0}}
    return {"device_name": "a GPU", "shape": "full",
            "setup": {"batch": {"rows": 4, "prompt_tokens": 512, "completion_tokens": 512, "new_tokens": 128}},
            "steps": {"lambda0": {"micro_step_s": 1.0, "optimizer_s": 0.1},
                      "lambda1": {"micro_step_s": 3.0, "optimizer_s": 0.1, "rollout_s": 2.0}},
            "evaluation": {"teacher": student, "student": student}}


def test_the_cost_of_a_sweep_is_its_runs_steps_and_evaluations():
    cost = rehearsal.study_cost(hand_made_report(), ["qwen_tuned", "qwen_rollout"])
    tuned = cost["sweeps"]["qwen_tuned"]  # lambda 1 and lambda 0, 10k steps each, accumulation 16
    assert (tuned["runs"], tuned["steps"]) == (2, 20000)
    heldout = (10000 // 250 + 2) * (256 / 4) * (1.0 / 3)  # 42 held-out passes of 64 batches at 1/3 micro-step
    documents = sum(rehearsal.FULL_SPLITS.values()) / 10.0
    fidelity = 2 * 256 * 128 / 100.0
    forms = 2  # a LoRA student is evaluated merged and in its adapter form
    runs = sum(10000 * (16 * micro + 0.1) + heldout + forms * (documents + fidelity) for micro in (3.0, 1.0))
    baselines = 2 * documents  # the teacher and one PTQ scheme, once per sweep
    assert tuned["gpu_h"] == pytest.approx((runs + baselines) / 3600)
    # 8 GPUs: 2 micro-steps each per optimizer step; GPU-hours are 8 x the wall-clock of training
    eight = sum(8 * (10000 * (2 * micro + 0.1) + heldout) + forms * (documents + fidelity) for micro in (3.0, 1.0))
    assert tuned["gpu_h_original_layout"] == pytest.approx((eight + baselines) / 3600)
    # 512 new tokens: the rollout scales with them, the rest of the step with the batch's length
    rollout = cost["sweeps"]["qwen_rollout"]
    micro_512 = 2.0 * 512 / 128 + 1.0 * (512 + 512) / (512 + 128)
    assert rollout["train_h"] == pytest.approx(sum(10000 * (16 * m + 0.1) for m in (2.0 * 256 / 128 + 1.0 * 768 / 640,
                                                                                     micro_512)) / 3600)
    assert any("not included" in a for a in cost["assumptions"])
    text = rehearsal.format_report({**hand_made_report(), "kind": "rehearsal", "preset": "p", "model": QWEN,
                                    "device": "cuda", "machine": "m", "date": "2026-01-01", "versions": {},
                                    "sections": {}, "checks": {}, "settings": {"budget_s": 1}, "cost": cost,
                                    "evaluation": {}, "steps": {}, "setup": None})
    assert "qwen_tuned" in text and f"{tuned['gpu_h']:.1f}" in text


def test_reports_are_never_overwritten(tmp_path):
    first = rehearsal.report_paths(tmp_path, "NVIDIA H100 80GB HBM3", "2026-01-01", "full")
    assert first[0].name == "rehearsal_nvidia-h100-80gb-hbm3_2026-01-01.txt"
    first[1].write_text("{}")  # a JSON alone is enough to move on
    second = rehearsal.report_paths(tmp_path, "NVIDIA H100 80GB HBM3", "2026-01-01", "full")
    assert second[0].name.endswith("_2.txt") and second[1].name.endswith("_2.json")
    assert rehearsal.report_paths(tmp_path, "cpu", "2026-01-01", "tiny")[0].name == "rehearsal_tiny_cpu_2026-01-01.txt"


def test_bad_settings_fail_in_one_line():
    with pytest.raises(ValueError, match="--shape"):
        rehearsal.RehearsalSettings(shape="huge")
    with pytest.raises(ValueError, match="--skip"):
        rehearsal.RehearsalSettings(skip=["nothing"])


@pytest.fixture
def bundle(tmp_path):
    path = tmp_path / "bundle"
    make_tokenizer().save_pretrained(path / rehearsal.BUNDLE_TOKENIZER)
    with (path / rehearsal.BUNDLE_CHATS).open("w") as f:
        for row in chat_rows(24):
            f.write(json.dumps(row) + "\n")
    return path


@pytest.mark.slow
def test_the_rehearsal_runs_end_to_end_at_the_tiny_shape(tmp_path, bundle):
    """Every section on CPU (compiled rollouts aside: compiling takes longer than the rest together), the
    report written as text and JSON, and the study's cost estimated from it."""
    out = tmp_path / "out"
    report = rehearsal.main(["--shape", "tiny", "--device", "cpu", "--bundle", str(bundle), "--out", str(out),
                             "--steps", "1", "--warmup", "0", "--eval-docs", "1", "--generation-rows", "2",
                             "--skip", "check_compiled_rollouts"])
    failed = {k: v.get("error") for k, v in report["sections"].items() if v["status"] == "failed"}
    assert not failed
    assert report["sections"]["check_compiled_rollouts"]["status"] == "skipped"
    assert len(report["sections"]) == len(rehearsal.SECTIONS)
    steps = report["steps"]
    assert steps["lambda1"]["scored_tokens"] == steps["trl_lambda1"]["scored_tokens"] == 2 * 8  # equal work
    assert steps["lambda0"]["optimizer_step_s"] == pytest.approx(16 * steps["lambda0"]["micro_step_s"]
                                                                 + steps["lambda0"]["optimizer_s"])
    assert report["setup"]["batch"] == {"rows": 2, "prompt_tokens": 32, "completion_tokens": 32, "new_tokens": 8,
                                        "tokenizer_ids": len(make_tokenizer())}
    assert report["evaluation"]["student"]["quantized_layers"] > 0
    assert math.isfinite(report["cost"]["total_gpu_h"]) and set(report["cost"]["sweeps"]) >= {"qwen_tuned"}
    [text] = out.glob("rehearsal_tiny_cpu_*.txt")
    saved = json.loads(text.with_suffix(".json").read_text())
    assert saved["sections"] == json.loads(json.dumps(report["sections"]))
    assert "qwen_lambda" in text.read_text()


def test_a_failing_section_is_recorded_and_the_rest_still_run(tmp_path, bundle, monkeypatch):
    monkeypatch.setattr(rehearsal, "check_span_perplexity", lambda *a: 1 / 0)
    report = rehearsal.run(rehearsal.RehearsalSettings(
        shape="tiny", device="cpu", bundle=str(bundle), steps=1, warmup=0, eval_docs=1,
        skip=["step_lambda1", "trl_lambda1", "eval_teacher", "eval_student", "check_span_scoring",
              "check_fidelity_order", "check_run_eval_export", "check_compiled_rollouts"]))
    assert report["sections"]["check_span_perplexity"]["status"] == "failed"
    assert "ZeroDivisionError" in report["sections"]["check_span_perplexity"]["error"]
    assert report["sections"]["step_lambda0"]["status"] == "passed"
    assert "cost" not in report  # no lambda=1 figures: nothing to estimate from
    text = rehearsal.format_report(report)
    assert "not estimated" in text and "ZeroDivisionError" in text
