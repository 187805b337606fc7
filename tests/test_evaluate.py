"""Evaluation orchestration on tiny models: validation, the baseline cache, eval.json, eval.ipynb."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import papermill as pm
import pytest
import torch

from onpolicy_lib import evaluate
from onpolicy_lib.config import ConfigError, TrainConfig
from onpolicy_lib.evaluate import EvalConfig, evaluate_runs
from onpolicy_lib.rollouts import packed_available
from onpolicy_lib.student import build_student, save_student
from onpolicy_lib.training import train
from tests.conftest import tiny_run

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def run_dir(tmp_path, tiny_model_dir, tiny_dataset_dir):
    return train(TrainConfig(**tiny_run(tiny_model_dir, tiny_dataset_dir, lmbda=0.0,
                                        output_dir=str(tmp_path / "run")))).path


def light(run_dirs, tmp_path, **overrides) -> EvalConfig:
    """No benchmarks or perplexity (they need the packaged data); fidelity on a few chats."""
    values = dict(run_dirs=[str(r) for r in run_dirs], tasks=[], perplexity_tokens=0, fidelity_samples=3,
                  generation_tasks=[], cache_dir=str(tmp_path / "cache"), device="cpu")
    values.update(overrides)
    return EvalConfig(**values)


@pytest.mark.parametrize(("overrides", "message"), [
    ({"tasks": ["hellaswag", "gsm8k"]}, "tasks"),
    ({"limit": 0}, "limit"),
    ({"mmlu_limit": -3}, "limit"),
    ({"batch_size": 0}, "batch_size must be a positive integer"),
    ({"perplexity_source": "c4"}, "perplexity_source must be one of lambada-offline, wikitext-2"),
    ({"calibrated": ["hqq"]}, r"^calibrated must be one of gptq, awq, gptq-original, awq-original; got 'hqq'$"),
    ({"dtype": "float16"}, "dtype must be one of auto, float32, bfloat16"),
    ({"generation_matmul": "fast"}, "generation_matmul must be one of linear, packed"),
])
def test_bad_eval_input_is_rejected(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        EvalConfig(model_name="x/y", quant_type="int4", group_size=32, **overrides).validate()


def test_a_baselines_record_is_new_json_and_only_without_students(tmp_path, run_dir):
    with pytest.raises(ConfigError, match="baselines_record is for an evaluation without run_dirs"):
        EvalConfig(run_dirs=[str(run_dir)], baselines_record=str(tmp_path / "b.json")).validate()
    lone = dict(run_dirs=[], model_name="x/y", quant_type="int8", group_size=32)
    with pytest.raises(ConfigError, match="baselines_record must be a .json path, got 'b.txt'"):
        EvalConfig(**lone, baselines_record="b.txt").validate()
    (tmp_path / "b.json").write_text("{}")
    with pytest.raises(ConfigError, match="b.json exists; delete it to evaluate again"):
        EvalConfig(**lone, baselines_record=str(tmp_path / "b.json")).validate()


def test_run_without_student_and_scheme_mismatch(tmp_path, run_dir):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="run_dirs: .*no trained student"):
        evaluate.plan_evaluation(EvalConfig(run_dirs=[str(tmp_path / "empty")]))
    with pytest.raises(ConfigError, match=r"group_size=64 does not match the student .* \(32\)"):
        evaluate.plan_evaluation(EvalConfig(run_dirs=[str(run_dir)], group_size=64))
    with pytest.raises(ConfigError, match=r"quant_type='int8' does not match"):
        evaluate.plan_evaluation(EvalConfig(run_dirs=[str(run_dir)], quant_type="int8"))


def test_teacher_and_ptq_are_cached_across_calls(tmp_path, run_dir, monkeypatch):
    calls = []
    original = evaluate.evaluate_model

    def counting(model, *args, **kwargs):
        calls.append(type(model).__name__)
        return original(model, *args, **kwargs)

    monkeypatch.setattr(evaluate, "evaluate_model", counting)
    table = evaluate_runs(light([run_dir], tmp_path))
    # The teacher is named with its precision; PTQ's fidelity is computed on the run's own setting.
    assert list(table["model"]) == ["teacher (float32)", "PTQ int4 g32", "run"]
    assert len(calls) == 4  # teacher; PTQ benchmarks and perplexity; PTQ fidelity; the student
    record = json.loads((run_dir / "eval.json").read_text())
    assert record["student"]["fidelity"]["examples"] == 3
    assert record["scheme"]["quant_type"] == "int4"
    ptq = table.set_index("model").loc["PTQ int4 g32"]
    assert ptq["forward_kl"] > 0 and 0 <= ptq["top1_agreement"] <= 1

    calls.clear()
    again = evaluate_runs(light([run_dir], tmp_path))
    assert len(calls) == 1, "teacher and PTQ come from the cache; only the student is evaluated"
    assert again.set_index("model").loc["PTQ int4 g32", "forward_kl"] == ptq["forward_kl"]
    assert len(list((tmp_path / "cache").glob("*.json"))) == 3


def test_baselines_without_students_are_judged_on_a_default_runs_chats(tmp_path, run_dir, tiny_model_dir,
                                                                        tiny_dataset_dir, monkeypatch):
    # With a default run's settings equal to this run's, PTQ alone is judged on exactly the chats and
    # generation settings the run's PTQ baseline was: the same cache entry, the same numbers.
    with_run = evaluate_runs(light([run_dir], tmp_path)).set_index("model").loc["PTQ int4 g32"]
    settings = dict(dataset_name=str(tiny_dataset_dir), max_length=96, max_new_tokens=6, min_completion_tokens=4)
    monkeypatch.setattr(evaluate, "TrainConfig", lambda **kw: TrainConfig(**{**settings, **kw}))
    calls = []
    original = evaluate.evaluate_model
    monkeypatch.setattr(evaluate, "evaluate_model", lambda *a, **k: calls.append(1) or original(*a, **k))
    alone = evaluate_runs(light([], tmp_path, model_name=str(tiny_model_dir), quant_type="int4", group_size=32))
    row = alone.set_index("model").loc["PTQ int4 g32"]
    assert row["forward_kl"] == with_run["forward_kl"] > 0 and row["top1_agreement"] == with_run["top1_agreement"]
    assert calls == [], "teacher, PTQ and PTQ's fidelity all come from the cache"


@pytest.mark.slow
def test_bf16_evaluation_is_explicit_cached_apart_and_close_to_fp32(tmp_path, run_dir, monkeypatch):
    """dtype=bfloat16 computes teacher, PTQ and student in bf16 on a CPU; their results are cached apart
    from fp32's, recorded, and close to fp32's (the tiny model's divergences move by bf16 rounding)."""
    dtypes = []
    original = evaluate.evaluate_model

    def recording(model, *args, **kwargs):
        dtypes.append(next(model.parameters()).dtype)
        return original(model, *args, **kwargs)

    monkeypatch.setattr(evaluate, "evaluate_model", recording)
    fp32 = evaluate_runs(light([run_dir], tmp_path)).set_index("model")
    assert set(dtypes) == {torch.float32}
    dtypes.clear()
    bf16 = evaluate_runs(light([run_dir], tmp_path, dtype="bfloat16")).set_index("model")
    assert dtypes == [torch.bfloat16] * 4  # teacher, PTQ, PTQ fidelity, student: none from fp32's cache
    assert len(list((tmp_path / "cache").glob("*.json"))) == 6
    record = json.loads((run_dir / "eval.json").read_text())
    assert record["config"]["dtype"] == "bfloat16"
    assert record["baselines"]["teacher"]["key"]["dtype"] == "torch.bfloat16"
    for model in ("PTQ int4 g32", "run"):
        assert bf16.loc[model, "forward_kl"] != fp32.loc[model, "forward_kl"]
        assert bf16.loc[model, "forward_kl"] == pytest.approx(fp32.loc[model, "forward_kl"], rel=0.2), model


def test_lora_student_is_evaluated_in_both_forms(tmp_path, tiny_model, tiny_model_dir, tiny_dataset_dir):
    run = tmp_path / "lora"
    student = build_student(tiny_model, "int4", 32, lora_r=4)
    save_student(student, run, str(tiny_model_dir), "int4", 32)
    (run / "config.json").write_text(json.dumps({"train": TrainConfig(
        model_name=str(tiny_model_dir), dataset_name=str(tiny_dataset_dir), max_length=96, max_new_tokens=6,
        min_completion_tokens=4, lora_r=4).to_dict()}))
    evaluate_runs(light([run], tmp_path, include_teacher=False, include_ptq=False))
    record = json.loads((run / "eval.json").read_text())
    assert {"student", "student_lora_adapter"} <= set(record)


@pytest.mark.slow
def test_eval_notebook_end_to_end(tmp_path, run_dir):
    out = tmp_path / "eval.out.ipynb"
    pm.execute_notebook(str(ROOT / "notebooks" / "eval.ipynb"), str(out), kernel_name="python3", cwd=str(ROOT),
                        progress_bar=False,
                        parameters={"run_dirs": [str(run_dir)], "tasks": [], "cache_dir": str(tmp_path / "cache"),
                                    "perplexity_tokens": 0, "fidelity_samples": 2, "device": "cpu",
                                    "generation_tasks": ["basic_skills_arithmetic"], "generation_limit": 2,
                                    "generation_max_new_tokens": 4})
    record = json.loads((run_dir / "eval.json").read_text())
    assert record["student"]["generation"]["greedy"]["summary"]["all"]["examples"] == 2
    assert "top1_agreement" in out.read_text() and "ROUGE-L" in out.read_text()


def test_list_parameters_given_as_strings(run_dir):
    # papermill -p passes lists as strings
    cfg = EvalConfig(run_dirs=f'["{run_dir}"]', tasks="arc_easy, winogrande").validate()
    assert cfg.run_dirs == [str(run_dir)] and cfg.tasks == ["arc_easy", "winogrande"]
    assert EvalConfig(run_dirs=str(run_dir), tasks=[]).validate().run_dirs == [str(run_dir)]


@dataclass(frozen=True)
class FakeItem:
    task: str
    id: str
    messages: list
    reference: str
    check: dict


FAKE_ITEMS = [FakeItem("gsm8k", "gsm8k:a", [{"role": "user", "content": "what is 2+2?"}], "so the answer is 4.",
                       {"answer": "4"}),
              FakeItem("gsm8k", "gsm8k:b", [{"role": "user", "content": "what is 3+3?"}], "so the answer is 6.",
                       {"answer": "6"})]


def test_generation_is_evaluated_for_every_model_and_cached(tmp_path, run_dir, monkeypatch):
    asked = []
    monkeypatch.setattr(evaluate.gen_tasks, "generation_items", lambda *a, **k: asked.append((a, k)) or FAKE_ITEMS)
    cfg = dict(generation_tasks=["gsm8k"], generation_max_new_tokens=5, generation_limit=2)
    table = evaluate_runs(light([run_dir], tmp_path, **cfg)).set_index("model")
    assert asked == [(("test", ["gsm8k"]), {"limit": 2, "seed": 0})]
    record = json.loads((run_dir / "eval.json").read_text())
    run_temperature = json.loads((run_dir / "config.json").read_text())["train"]["temperature"]
    for result in (record["student"], record["baselines"]["teacher"], record["baselines"]["ptq"]):
        generation = result["generation"]
        assert generation["settings"]["temperature"] == run_temperature  # the run's own, by default
        assert [r["id"] for r in generation["greedy"]["per_example"]] == ["gsm8k:a", "gsm8k:b"]
        assert len(generation["sampled"]["per_example"]) == 2
        assert all(0 <= r["rouge_l"] <= 1 and r["teacher_nll"] > 0 for r in generation["greedy"]["per_example"])
    assert {"gen_greedy/rouge_l", "gen_sampled/teacher_nll", "gen_greedy/hit_cap"} <= set(table.columns)

    calls = []
    original = evaluate.evaluate_model
    monkeypatch.setattr(evaluate, "evaluate_model", lambda m, *a, **k: calls.append(k.get("parts")) or original(m, *a,
                                                                                                              **k))
    again = evaluate_runs(light([run_dir], tmp_path, **cfg)).set_index("model")
    assert len(calls) == 1, "the baselines' generation comes from the cache"
    assert again.loc["PTQ int4 g32", "gen_greedy/rouge_l"] == table.loc["PTQ int4 g32", "gen_greedy/rouge_l"]
    # Another temperature is another measurement.
    evaluate_runs(light([run_dir], tmp_path, generation_temperature=0.5, **cfg))
    assert len(calls) == 4
    # So are other decode-step products (equal within rounding, but not the same computation); the
    # default's key is unchanged, so earlier caches and committed results keep theirs.
    assert "matmul" not in EvalConfig().generation_settings()
    if packed_available():
        evaluate_runs(light([run_dir], tmp_path, generation_matmul="packed", **cfg))
        assert len(calls) == 7
        assert json.loads((run_dir / "eval.json").read_text())["student"]["generation"]["settings"]["matmul"] == (
            "packed")
