"""The training pipeline end to end on a tiny model: artifacts, determinism, resume, refusal."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from onpolicy_lib.config import ConfigError, TrainConfig
from onpolicy_lib.student import load_student
from onpolicy_lib.training import train
from tests.conftest import tiny_run


def tiny_config(model_dir: Path, data_dir: Path, out: Path, **overrides) -> TrainConfig:
    return TrainConfig(**tiny_run(model_dir, data_dir, **{
        "max_steps": 4, "lmbda": 0.5, "learning_rate": 1e-3, "save_steps": 2, "heldout_eval_size": 4,
        "output_dir": str(out), **overrides}))


def test_run_directory_contents(tmp_path, tiny_model_dir, tiny_dataset_dir):
    cfg = tiny_config(tiny_model_dir, tiny_dataset_dir, tmp_path / "run")
    result = train(cfg)
    run = result.path
    assert result.state == "new"
    saved = json.loads((run / "config.json").read_text())
    assert saved["train"] == cfg.to_dict() and saved["resolved"]["group_size"] == 32
    # What the teacher is, the machine that ran, and how far the student's grid is from the teacher's.
    assert saved["teacher"]["format"] == "checkpoint" and "native precision" in saved["teacher"]["summary"]
    assert "CPU cores" in saved["machine"] and saved["resolved"]["weight_error_vs_teacher"] > 0
    assert set(saved["filter_counts"]) == {"train", "heldout"} and saved["filter_counts"]["train"]["kept"] > 0
    assert sum(saved["resolved"]["heldout_sources"].values()) == 4
    metrics = json.loads((run / "metrics.json").read_text())
    assert [s["step"] for s in metrics["steps"]] == [1, 2, 3, 4]
    assert all(s["loss"] > 0 and s["learning_rate"] is not None for s in metrics["steps"])
    for key in ("wall_time_s", "median_step_s", "tokens_generated", "tokens_trained", "peak_memory_mb"):
        assert metrics[key] is not None and metrics[key] >= 0, key
    assert metrics["batches"] == 4
    # every on-policy batch generated something; off-policy ones generated nothing
    assert (metrics["tokens_generated"] > 0) == (metrics["batches_on_policy"] > 0)
    assert (run / "train_log.jsonl").is_file()
    assert not list(run.glob("checkpoint-*")), "checkpoints are removed once the student is saved"

    # The saved student reloads: fake-quantized (training numerics) and converted (deployment) agree.
    fake = load_student(run, convert=False)
    real = load_student(run, convert=True)
    ids = torch.randint(4, 40, (1, 12))
    with torch.no_grad():
        assert torch.equal(fake(ids).logits, real(ids).logits)

    # Coming back with the same config reuses the finished run instead of retraining.
    again = train(cfg)
    assert again.state == "complete" and again.metrics == metrics


def test_same_seed_same_losses(tmp_path, tiny_model_dir, tiny_dataset_dir):
    a = train(tiny_config(tiny_model_dir, tiny_dataset_dir, tmp_path / "a", lmbda=0.5))
    b = train(tiny_config(tiny_model_dir, tiny_dataset_dir, tmp_path / "b", lmbda=0.5))
    assert a.losses == b.losses
    assert a.metrics["tokens_generated"] == b.metrics["tokens_generated"]
    c = train(tiny_config(tiny_model_dir, tiny_dataset_dir, tmp_path / "c", lmbda=0.5, seed=7))
    assert c.losses != a.losses


def kill_at_step_3(cfg: TrainConfig, monkeypatch) -> None:
    """Run ``cfg`` until it is killed (KeyboardInterrupt) in its third step, after checkpoint-2."""
    from onpolicy_lib import distill

    original = distill.DistillTrainer.training_step

    def dies_at_step_3(self, model, inputs, num_items_in_batch=None):
        if self.state.global_step == 2:
            raise KeyboardInterrupt("simulated kill")
        return original(self, model, inputs, num_items_in_batch)

    monkeypatch.setattr(distill.DistillTrainer, "training_step", dies_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    monkeypatch.setattr(distill.DistillTrainer, "training_step", original)


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_result(tmp_path, tiny_model_dir, tiny_dataset_dir, monkeypatch):

    full = train(tiny_config(tiny_model_dir, tiny_dataset_dir, tmp_path / "full", lmbda=1.0))

    cfg = tiny_config(tiny_model_dir, tiny_dataset_dir, tmp_path / "killed", lmbda=1.0)
    kill_at_step_3(cfg, monkeypatch)
    assert (tmp_path / "killed" / "checkpoint-2").is_dir()
    assert not (tmp_path / "killed" / "metrics.json").exists()

    resumed = train(cfg)
    assert resumed.state == "resume" and resumed.metrics["resumed_from"] == "checkpoint-2"
    assert resumed.losses == pytest.approx(full.losses, rel=1e-6)
    assert resumed.metrics["tokens_generated"] == full.metrics["tokens_generated"]


def test_different_config_is_refused_and_nothing_is_touched(tmp_path, tiny_model_dir, tiny_dataset_dir):
    out = tmp_path / "run"
    train(tiny_config(tiny_model_dir, tiny_dataset_dir, out, max_steps=2))
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    with pytest.raises(ConfigError, match=r"different config \(lmbda: 0.5 -> 1"):
        train(tiny_config(tiny_model_dir, tiny_dataset_dir, out, max_steps=2, lmbda=1.0))
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


def test_lora_student(tmp_path, tiny_model_dir, tiny_dataset_dir):
    result = train(tiny_config(tiny_model_dir, tiny_dataset_dir, tmp_path / "lora", lora_r=4, max_steps=2))
    meta = json.loads((result.path / "student" / "quantization.json").read_text())
    assert meta["format"] == "lora-adapter"
    assert (result.path / "student" / "adapter_model.safetensors").is_file()
    assert not (result.path / "student" / "model.safetensors").exists()  # adapter only, not a full copy
    model = load_student(result.path, convert=True)
    assert not hasattr(model, "peft_config")  # merged for deployment


def test_embeddings_frozen_by_default_and_the_heldout_curve(tmp_path, tiny_model_dir, tiny_dataset_dir):
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(tiny_model_dir, tiny_dataset_dir, tmp_path / "run", eval_steps=2)
    run = train(cfg)
    teacher = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    student = load_student(run.path, convert=False)
    embedding = student.get_input_embeddings().weight
    assert torch.equal(embedding, teacher.get_input_embeddings().weight)  # not trained
    moved = [n for n, p in student.named_parameters() if "proj" in n
             and not torch.equal(p, dict(teacher.named_parameters())[n])]
    assert moved  # the quantized layers did train
    # The held-out divergence every eval_steps, with the untrained start as step 0.
    curve = run.metrics["heldout_curve"]
    assert [c["step"] for c in curve] == [0, 2, 4] and curve[0]["loss"] == run.metrics["heldout_loss_before"]
    # With train_embeddings the shared embedding/head matrix moves too.
    both = train(tiny_config(tiny_model_dir, tiny_dataset_dir, tmp_path / "emb", train_embeddings=True))
    trained = load_student(both.path, convert=False).get_input_embeddings().weight
    assert not torch.equal(trained, teacher.get_input_embeddings().weight)


def test_bf16_training_keeps_float32_master_weights_that_move_at_small_learning_rates(
        tmp_path, tiny_model_dir, tiny_dataset_dir):
    # The failure this prevents: a 1e-5 step is below bf16 resolution for any weight above ~0.004.
    assert torch.tensor(0.02, dtype=torch.bfloat16) + 1e-5 == torch.tensor(0.02, dtype=torch.bfloat16)
    from safetensors.torch import load_file

    cfg = tiny_config(tiny_model_dir, tiny_dataset_dir, tmp_path / "bf16", dtype="bfloat16", learning_rate=1e-5,
                      max_steps=2, lmbda=0.5)
    run = train(cfg)
    assert json.loads((run.path / "config.json").read_text())["resolved"]["dtype"] == "torch.bfloat16"
    teacher = load_file(tiny_model_dir / "model.safetensors")
    student = load_file(run.path / "student" / "model.safetensors")
    layer = "model.layers.0.mlp.down_proj.weight"
    assert student[layer].dtype == torch.float32
    start = teacher[layer].to(torch.bfloat16).float()  # where training started: the bf16 teacher's values
    moved = (student[layer] != start)[start.abs() > 0.004].float().mean()
    assert moved > 0.9
    assert (student[layer] - start).abs().max() < 1e-4  # small steps, not a re-initialisation


def test_full_fine_tuning_that_cannot_fit_is_refused_with_the_arithmetic():
    from onpolicy_lib.training import check_memory

    counts = {"total": 4_000_000_000, "embeddings": 400_000_000}
    cfg = TrainConfig(model_name="Qwen/Qwen3-4B-Instruct-2507", device="cpu")
    with pytest.raises(ConfigError, match=r"does not fit cpu: teacher .* \+ AdamW moments .* GiB before activations"):
        check_memory({k: v * 100 for k, v in counts.items()}, cfg, torch.device("cpu"), torch.bfloat16)
    check_memory({"total": 1000, "embeddings": 100}, cfg, torch.device("cpu"), torch.bfloat16)


def test_fsdp_divides_the_students_states_among_the_processes():
    from onpolicy_lib.training import check_memory, memory_estimate

    counts = {"total": 1000, "embeddings": 0}
    cfg = TrainConfig(model_name="Qwen/Qwen3-4B-Instruct-2507", fsdp=True)
    whole, sharded = memory_estimate(counts, cfg, torch.bfloat16), memory_estimate(counts, cfg, torch.bfloat16, 2)
    assert whole["total"] == 2000 + 4000 + 4000 + 8000
    assert sharded["teacher"] == 2000 and sharded["total"] == 2000 + 16000 / 2
    # At least the whole float32 student it is built as before sharding.
    assert memory_estimate(counts, cfg, torch.bfloat16, 8)["total"] == 2000 + 4000
    big = {"total": 4_000_000_000 * 100, "embeddings": 0}
    with pytest.raises(ConfigError, match=r"\(1/8 each\).* use more processes \(fsdp"):
        check_memory(big, cfg, torch.device("cpu"), torch.bfloat16, shards=8)
    with pytest.raises(ConfigError, match=r"or fsdp True with several processes"):
        check_memory(big, cfg, torch.device("cpu"), torch.bfloat16)


@pytest.mark.slow
def test_resuming_under_another_scheme_is_refused(tmp_path, tiny_model_dir, tiny_dataset_dir, monkeypatch):
    # Same parameters, another device: int4 would mean Int4WeightOnlyConfig's asymmetric grid on CUDA.
    from onpolicy_lib import quantization

    cfg = tiny_config(tiny_model_dir, tiny_dataset_dir, tmp_path / "run")
    kill_at_step_3(cfg, monkeypatch)
    cuda = quantization.describe_scheme("int4", 32, "cuda")
    monkeypatch.setattr(quantization, "describe_scheme", lambda *args, **kwargs: cuda)
    with pytest.raises(quantization.QuantizationError,
                       match=r"resuming .*config: 'IntxWeightOnlyConfig' -> 'Int4WeightOnlyConfig'"
                             r".*mapping: 'symmetric' -> 'asymmetric'"):
        train(cfg)


def test_cakld_run_records_the_teachers_confidence(tmp_path, tiny_model_dir, tiny_dataset_dir):
    result = train(tiny_config(tiny_model_dir, tiny_dataset_dir, tmp_path / "cakld", divergence="cakld",
                               cakld_confidence_chats=6, max_steps=2))
    record = json.loads((result.path / "config.json").read_text())
    confidence = record["resolved"]["cakld_confidence"]
    assert confidence["chats"] == 6 and confidence["tokens"] > 0 and 0 < confidence["gamma"] < 1
    assert record["train"]["divergence"] == "cakld"
    assert all(step["loss"] >= 0 for step in result.metrics["steps"])


def test_command_line_values_read_as_papermill_reads_them():
    from onpolicy_lib.training import parameter_value

    assert parameter_value("None") is None and parameter_value("null") is None
    assert parameter_value("True") is True and parameter_value("32") == 32 and parameter_value("1e-3") == 1e-3
    assert parameter_value("{limit: 20}") == {"limit": 20} and parameter_value("cuda") == "cuda"
    # What a sweep with --num-processes launches reads back as its parameters (fsdp is one of them).
    from onpolicy_lib.sweep import training_command

    params = {"fsdp": True, "lora_r": None, "learning_rate": 1e-5, "eval_parameters": {"limit": 20}}
    line = training_command(params, 8)
    assert line[1:4] == ["launch", "--num_processes", "8"] and "--multi_gpu" in line
    given = line[line.index("onpolicy_lib.training") + 1:]
    assert {given[i + 1]: parameter_value(given[i + 2]) for i in range(0, len(given), 3)} == params


@pytest.mark.slow
def test_a_checkpoint_resumes_only_as_it_was_sharded(tmp_path, tiny_model_dir, tiny_dataset_dir, monkeypatch):
    cfg = tiny_config(tiny_model_dir, tiny_dataset_dir, tmp_path / "run", max_steps=3)
    kill_at_step_3(cfg, monkeypatch)
    (tmp_path / "run" / "checkpoint-2" / "pytorch_model_fsdp_0").mkdir()  # as a sharded run writes it
    with pytest.raises(ConfigError, match=r"checkpoint-2 was written with the student sharded; run it as it was "
                                          r"\(fsdp True with several processes\)"):
        train(cfg)


def test_report_to_tensorboard_writes_the_curves_and_the_runs_parameters(tmp_path, tiny_model_dir, tiny_dataset_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = tiny_config(tiny_model_dir, tiny_dataset_dir, tmp_path / "run", max_steps=2, report_to="tensorboard")
    run = train(cfg).path
    logs = {p.parent for p in run.glob("runs/*/events.out.tfevents.*")}
    assert len(logs) == 1, "one TensorBoard run, under the run directory"
    log = EventAccumulator(str(logs.pop()), size_guidance={"tensors": 0, "scalars": 0}).Reload()
    assert [e.step for e in log.Scalars("train/loss")] == [1, 2]
    text = log.Tensors("train_config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert json.loads(text.strip("`\n")) == json.loads((run / "config.json").read_text())["train"]
    assert json.loads((run / "config.json").read_text())["train"]["report_to"] == "tensorboard"


def test_report_to_is_checked_up_front(tmp_path, monkeypatch):
    from onpolicy_lib import config

    with pytest.raises(ConfigError, match=r"^report_to must be one of none, tensorboard, wandb, trackio; got 'mlf"):
        TrainConfig(report_to=["tensorboard", "mlflow"]).trackers()
    with pytest.raises(ConfigError, match=r"^report_to must be none, one of tensorboard, wandb, trackio or a list"):
        TrainConfig(report_to=["none", "wandb"]).trackers()
    assert TrainConfig().trackers() == [] and TrainConfig(report_to="tensorboard,tensorboard").trackers() == [
        "tensorboard"]
    monkeypatch.setitem(config.TRACKERS, "tensorboard", ("no_such_package_here",))
    with pytest.raises(ConfigError, match=r"^report_to 'tensorboard' needs the no_such_package_here package, which "
                                          r"is not installed: pip install -e '\.\[tensorboard\]'$"):
        TrainConfig(report_to="tensorboard").trackers()


@pytest.mark.slow
def test_every_process_of_a_resumed_run_reads_its_earlier_record(tmp_path, tiny_model_dir, tiny_dataset_dir,
                                                                 monkeypatch):
    # The main process rewrites config.json for the new attempt (without what the earlier one resolved) while
    # the others may not have read it yet: each reads the record as it planned, so all resume alike (a
    # process that missed the recorded rollout form would wait for a broadcast the main one never sends).
    from types import SimpleNamespace

    from onpolicy_lib import training

    cfg = tiny_config(tiny_model_dir, tiny_dataset_dir, tmp_path / "run", max_steps=3, lmbda=1.0)
    kill_at_step_3(cfg, monkeypatch)
    config = tmp_path / "run" / "config.json"
    earlier = json.loads(config.read_text())["resolved"]["rollout"]
    run = training.plan(cfg)
    assert run.state == "resume"
    config.write_text(json.dumps({"train": run.recorded["train"]}))  # what the main process writes first
    processes = SimpleNamespace(num_processes=2, is_main_process=False)
    setup = training.settle(cfg, run, processes)
    assert setup.previous["rollout"] == earlier
    assert training.rollout_form(cfg, setup, None, None, None, run) == earlier
