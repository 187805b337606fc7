"""Several processes through ``accelerate launch`` (DDP over gloo on CPU), against one process.

Two processes with one chat each make the same global batch as one process with two (the
sampler gives process i the i-th chat of each global batch), so the first steps' losses match;
later steps drift apart only as far as fake quantization amplifies summation-order differences
(a weight near a rounding boundary lands on either side).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # each test launches several training processes

ACCELERATE = Path(sys.executable).with_name("accelerate")
TIMEOUT = 300  # a launch takes seconds to a minute; a hung collective waits far longer


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (the launcher's workers), from /proc."""
    children = Path(f"/proc/{pid}/task/{pid}/children")
    found = [int(c) for c in children.read_text().split()] if children.is_file() else []
    return found + [d for c in found for d in descendants(c)]


def launch(tmp_path: Path, name: str, processes: int, batch: int, model_dir: Path, data_dir: Path,
           script: Path | None = None, **params) -> dict:
    settings = {"model_name": model_dir, "dataset_name": data_dir, "group_size": 32, "max_steps": 3, "max_length": 96,
                "max_new_tokens": 6, "min_completion_tokens": 4, "heldout_eval_size": 4, "device": "cpu",
                "learning_rate": 1e-3, "per_device_train_batch_size": batch, "output_dir": tmp_path / name, **params}
    args = [a for k, v in settings.items() for a in ("-p", k, str(v))]
    # torchrun-style launcher (accelerate's --multi_gpu): on a machine without GPUs the processes use gloo.
    launcher = ([str(ACCELERATE), "launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
                 "--mixed_precision", "no", "--dynamo_backend", "no"]
                if processes > 1 else [sys.executable])
    launcher += [str(script)] if script else ["-m", "onpolicy_lib.training"]
    # PYTHONFAULTHANDLER: a process stopped with SIGABRT prints every thread's Python stack.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONFAULTHANDLER": "1"}
    done = subprocess.Popen(launcher + args, cwd=Path(__file__).resolve().parents[1], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        stdout, stderr = done.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        # A hung process group: abort the workers so the failure shows where each one was waiting.
        for pid in descendants(done.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGABRT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            done.communicate(timeout=30)
        done.kill()
        stdout, stderr = done.communicate()
        pytest.fail(f"{name}: no result after {TIMEOUT} s; the processes' stacks:\n{stderr[-12000:]}\n{stdout[-2000:]}")
    assert done.returncode == 0, stderr[-3000:]
    run = tmp_path / name
    return {"metrics": json.loads((run / "metrics.json").read_text()),
            "config": json.loads((run / "config.json").read_text()),
            "log": [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]}


@pytest.mark.skipif(not ACCELERATE.is_file(), reason="accelerate's launcher is not installed beside python")
def test_two_processes_train_the_global_batch_of_one(tmp_path, tiny_model_dir, tiny_dataset_dir):
    one = launch(tmp_path, "one", 1, 2, tiny_model_dir, tiny_dataset_dir, lmbda=0.0)
    two = launch(tmp_path, "two", 2, 1, tiny_model_dir, tiny_dataset_dir, lmbda=0.0)
    assert two["config"]["processes"] == 2 and one["config"]["processes"] == 1
    a, b = ([s["loss"] for s in r["metrics"]["steps"]] for r in (one, two))
    assert b[0] == pytest.approx(a[0], rel=1e-6) and b[1] == pytest.approx(a[1], rel=1e-5)
    assert b[2] == pytest.approx(a[2], rel=0.05)
    assert two["metrics"]["heldout_loss_before"] == pytest.approx(one["metrics"]["heldout_loss_before"], rel=1e-6)
    # Counts are the whole run's, over both processes; the log has one line per step, not one per process.
    assert two["metrics"]["tokens_trained"] == one["metrics"]["tokens_trained"]
    assert [r["step"] for r in two["log"] if "loss" in r] == [1, 2, 3]


@pytest.mark.skipif(not ACCELERATE.is_file(), reason="accelerate's launcher is not installed beside python")
def test_processes_share_each_on_policy_draw(tmp_path, tiny_model_dir, tiny_dataset_dir):
    # One draw per micro-step, the same in every process (it is keyed by seed, step and micro-batch):
    # a step is on-policy everywhere or nowhere, so no process waits for another's rollouts.
    two = launch(tmp_path, "mixed", 2, 1, tiny_model_dir, tiny_dataset_dir, lmbda=0.5, max_steps=6)
    per_step = [r["batches_on_policy"] for r in two["log"] if "loss" in r]
    assert set(per_step) <= {0, 2} and 0 < sum(per_step) < 12
    assert two["metrics"]["tokens_generated"] > 0


@pytest.mark.skipif(not ACCELERATE.is_file(), reason="accelerate's launcher is not installed beside python")
def test_a_sweep_runs_and_emits_multi_process_runs(tmp_path, tiny_model_dir, tiny_dataset_dir, capsys, monkeypatch):
    import yaml

    from onpolicy_lib import sweep

    params = {"model_name": str(tiny_model_dir), "dataset_name": str(tiny_dataset_dir), "group_size": 32,
              "max_steps": 2, "max_length": 96, "max_new_tokens": 6, "min_completion_tokens": 4,
              "heldout_eval_size": 4, "device": "cpu", "per_device_train_batch_size": 1}
    spec = tmp_path / "mp.yaml"
    spec.write_text(yaml.safe_dump({"name": "mp", "params": params, "grid": {"lmbda": [1.0]}, "analysis": False}))
    out = ["--outputs", str(tmp_path / "out")]
    assert sweep.main([str(spec), *out, "--emit-commands", "--num-processes", "2"]) == 0
    assert capsys.readouterr().out.strip().endswith("--num-processes 2")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert sweep.main([str(spec), *out, "--num-processes", "2"]) == 0
    run = tmp_path / "out" / "mp" / "run"  # one run: nothing varies
    assert json.loads((run / "config.json").read_text())["processes"] == 2
    assert json.loads((run / "metrics.json").read_text())["batches_on_policy"] == 4  # 2 steps x 2 processes
    assert "accelerate" in (run / "sweep-log.txt").read_text()


@pytest.mark.skipif(not ACCELERATE.is_file(), reason="accelerate's launcher is not installed beside python")
def test_fsdp_shards_the_student_trains_the_global_batch_of_one_and_resumes(tmp_path, tiny_model_dir, tiny_dataset_dir):
    from safetensors.torch import load_file

    from onpolicy_lib.student import load_student

    # Two micro-batches per step (the gradients FSDP keeps unreduced between them are scaled after the
    # last). lmbda 0.3 with seed 42: steps 1 and 2 are off-policy (comparable across layouts), step 3
    # samples a rollout from the sharded student. One process with fsdp runs unsharded: the reference.
    params = {"lmbda": 0.3, "fsdp": True, "save_steps": 2, "gradient_accumulation_steps": 2}
    one = launch(tmp_path, "one", 1, 2, tiny_model_dir, tiny_dataset_dir, **params)
    two = launch(tmp_path, "two", 2, 1, tiny_model_dir, tiny_dataset_dir, **params)
    assert one["config"]["resolved"]["sharded"] is False and two["config"]["resolved"]["sharded"] is True
    # Process 0 held about half the student's parameters while training (uneven rows round up).
    total, held = one["metrics"]["student_parameters_held"], two["metrics"]["student_parameters_held"]
    assert total // 2 <= held < 0.6 * total
    a, b = ([s["loss"] for s in r["metrics"]["steps"]] for r in (one, two))
    norms = [[r["grad_norm"] for r in run["log"] if "loss" in r] for run in (one, two)]
    assert b[0] == pytest.approx(a[0], rel=1e-6) and norms[1][0] == pytest.approx(norms[0][0], rel=1e-5)
    assert b[1] == pytest.approx(a[1], rel=0.01)  # fake quantization amplifies summation-order differences
    assert [r["batches_on_policy"] for r in two["log"] if "loss" in r] == [0, 0, 2]
    assert two["metrics"]["tokens_generated"] > 0 and b[2] > 0
    assert two["metrics"]["heldout_loss_before"] == pytest.approx(one["metrics"]["heldout_loss_before"], rel=1e-6)
    # The same run directory, checkpoints (sharded ones included) removed once the student is saved.
    files = [sorted(str(p.relative_to(tmp_path / n)) for p in (tmp_path / n).rglob("*")) for n in ("one", "two")]
    assert files[0] == files[1]
    # The student was gathered whole: the same tensors as an unsharded run's, and it reloads.
    saved = [load_file(tmp_path / n / "student" / "model.safetensors") for n in ("one", "two")]
    assert {k: (v.shape, v.dtype) for k, v in saved[0].items()} == {k: (v.shape, v.dtype) for k, v in saved[1].items()}
    student = load_student(tmp_path / "two", convert=True)
    assert student.get_input_embeddings().weight.shape[0] > 0

    # Killed at its third step, after the sharded checkpoint of step 2, the run resumes from it to
    # the uninterrupted run's losses (weights, optimizer state and sampling state restored).
    killer = tmp_path / "kill_at_step_3.py"
    killer.write_text(
        "import os, sys\n"
        "import torch\n"
        "sys.path.insert(0, os.getcwd())  # this checkout's library, as -m finds it\n"
        "from onpolicy_lib import distill, training\n"
        "step = distill.DistillTrainer.training_step\n"
        "def stop(self, *args, **kwargs):\n"
        "    if self.state.global_step == 2:\n"
        "        # Every process here: the main one has finished writing checkpoint-2 (a process leaving\n"
        "        # earlier would stop it mid-write, and the resumed run would rightly start from scratch).\n"
        "        torch.distributed.barrier()\n"
        "        raise SystemExit(3)\n"
        "    return step(self, *args, **kwargs)\n"
        "distill.DistillTrainer.training_step = stop\n"
        "training.main()\n")
    with pytest.raises(AssertionError):
        launch(tmp_path, "killed", 2, 1, tiny_model_dir, tiny_dataset_dir, script=killer, **params)
    checkpoint = tmp_path / "killed" / "checkpoint-2"
    assert list(checkpoint.glob("pytorch_model_fsdp*")) and not (tmp_path / "killed" / "metrics.json").exists()
    resumed = launch(tmp_path, "killed", 2, 1, tiny_model_dir, tiny_dataset_dir, **params)
    assert resumed["metrics"]["resumed_from"] == "checkpoint-2"
    assert [s["loss"] for s in resumed["metrics"]["steps"]] == pytest.approx(b, rel=1e-6)

