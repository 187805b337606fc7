"""Sweep specs, the resumable papermill runner and results collection (tiny models, no assets)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from onpolicy_lib import results, sweep
from onpolicy_lib.sweep import SweepError, expand
from tests.conftest import tiny_run

ROOT = Path(__file__).resolve().parents[1]


def write_spec(tmp_path: Path, name: str = "tiny", **spec) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, **spec}))
    return path


@pytest.fixture
def params(tiny_model_dir, tiny_dataset_dir):
    return tiny_run(tiny_model_dir, tiny_dataset_dir)


def test_expansion_crosses_runs_grid_and_seeds(tmp_path, params):
    spec = write_spec(tmp_path, params=params, runs=[{"beta": 0.0}, {"beta": 1.0}], grid={"lmbda": [0, 1]},
                      seeds=[1, 2])
    s = expand(spec, tmp_path / "out")
    assert len(s.runs) == 8
    names = [r.name for r in s.runs]
    assert len(set(names)) == 8 and "beta-0_lmbda-0_seed-1" in names
    run = next(r for r in s.runs if r.name == "beta-1_lmbda-1_seed-2")
    assert run.path == tmp_path / "out" / "tiny" / run.name
    assert run.params["beta"] == 1.0 and run.params["lmbda"] == 1 and run.params["seed"] == 2
    assert run.params["max_steps"] == 2 and run.params["output_dir"] == str(run.path)  # outside the project
    assert run.varying == {"beta": 1.0, "lmbda": 1, "seed": 2}
    assert not (tmp_path / "out").exists()  # expansion writes nothing


@pytest.mark.parametrize(("spec", "message"), [
    ({"grid": {"lmbda_typo": [0, 1]}}, "grid: unknown or runner-set parameter\\(s\\) lmbda_typo"),
    ({"grid": {"lmbda": [0, 2]}}, "run lmbda-2 \\(lmbda=2\\): lmbda must be a number in \\[0, 1\\]"),
    ({"grid": {}}, "grid is empty"),
    ({"grid": {"lmbda": []}}, "grid.lmbda must be a non-empty list"),
    ({"runs": []}, "runs is empty"),
    ({"params": {"output_dir": "x"}}, "params: unknown or runner-set parameter\\(s\\) output_dir"),
    ({"sweep_over": {"lmbda": [0]}}, "unknown key\\(s\\) sweep_over"),
    ({"seeds": ["a"]}, "seeds must be a non-empty list of integers"),
    ({"grid": {"group_size": [32, 48]}}, "group_size"),
    ({"eval": True, "eval_parameters": {"tasks": ["hellaswag", "nope"]}}, "eval_parameters: .*nope"),
    ({"eval": True, "eval_parameters": {"limit_typo": 3}}, "eval_parameters: unknown parameter\\(s\\) limit_typo"),
    # eval.ipynb has perplexity_window, but not this: refused, never silently ignored.
    ({"eval": True, "eval_parameters": {"perplexity_windw": 3}}, "unknown parameter\\(s\\) perplexity_windw"),
    ({"eval": True, "eval_parameters": {"perplexity_window": 1}}, "perplexity_window must be"),
    ({"include": "missing.yaml"}, "include: 'missing.yaml' not found"),
    # The original's g128 recipes on a model of width 64: refused before any run trains.
    ({"grid": {"lmbda": [0]}, "eval": True, "eval_parameters": {"calibrated": ["gptq-original"]}},
     "eval_parameters: calibrated: gptq-original quantizes in groups of 128, which do not divide"),
])
def test_bad_specs_are_refused_at_expansion(tmp_path, params, spec, message):
    spec = write_spec(tmp_path, params={**params, **spec.pop("params", {})}, **spec)
    with pytest.raises(SweepError, match=message):
        expand(spec, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_malformed_spec_names_its_file_and_line(tmp_path):
    spec = tmp_path / "broken.yaml"
    spec.write_text("name: broken\nparams:\n  lmbda: [0, 1\n  seed: 1\n")
    with pytest.raises(SweepError, match=r"^\S*broken.yaml, line 4, column 7: not valid YAML \(.*\)$"):
        sweep.read_spec(spec)


def test_include_extends_a_fragment(tmp_path, params):
    (tmp_path / "_shared.yaml").write_text(yaml.safe_dump(
        {"params": params, "eval": True, "eval_parameters": {"tasks": [], "limit": 5}}))
    spec = write_spec(tmp_path, include="_shared.yaml", params={"beta": 0.0}, grid={"lmbda": [0, 1]},
                      eval_parameters={"limit": 7})
    s = expand(spec, tmp_path / "out")
    assert s.eval and len(s.runs) == 2
    run = s.runs[0]
    assert run.params["beta"] == 0.0 and run.params["max_steps"] == 2  # params merged key by key
    assert run.params["eval_parameters"] == {"tasks": [], "limit": 7}
    (tmp_path / "_a.yaml").write_text("include: _b.yaml\n")
    (tmp_path / "_b.yaml").write_text("include: _a.yaml\n")
    with pytest.raises(SweepError, match="include cycle"):
        expand(write_spec(tmp_path, include="_a.yaml", params=params), tmp_path / "out")


def test_two_specs_writing_one_run_dir_with_different_configs_are_refused(tmp_path, params):
    first = expand(write_spec(tmp_path, "same", params=params, grid={"lmbda": [0, 1]}), tmp_path / "out")
    sweep.record_manifest(first)  # what the runner does before its first run
    (tmp_path / "other").mkdir()
    other = write_spec(tmp_path / "other", "same", params={**params, "beta": 0.0}, grid={"lmbda": [0, 1]})
    with pytest.raises(SweepError, match="belongs to spec .* different config \\(beta: 0.5 -> 0.0\\)"):
        expand(other, tmp_path / "out")
    # The same spec again is fine: that is how a sweep resumes.
    assert len(expand(write_spec(tmp_path, "same", params=params, grid={"lmbda": [0, 1]}), tmp_path / "out").runs) == 2


def test_dry_run_and_emitted_commands(tmp_path, params, capsys):
    spec = write_spec(tmp_path, params=params, grid={"lmbda": [0, 1]}, seeds=[1, 2])
    assert sweep.main([str(spec), "--outputs", str(tmp_path / "out"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "4 runs" in out and out.count("pending") == 4 and "lmbda-1_seed-2/train.ipynb" in out
    assert sweep.main([str(spec), "--outputs", str(tmp_path / "out"), "--emit-commands"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4 and all("-m onpolicy_lib.sweep" in ln and "--run" in ln for ln in lines)
    assert sweep.main([str(tmp_path / "missing.yaml")]) == 2
    assert "not found" in capsys.readouterr().err


def test_analysis_only_renders_over_the_finished_runs_and_runs_nothing(tmp_path, params, capsys, monkeypatch):
    spec = write_spec(tmp_path, params=params, grid={"lmbda": [0, 1]}, seeds=[1, 2])
    out = tmp_path / "out"

    def never(*args, **kwargs):
        raise AssertionError("--analysis-only started a run")

    monkeypatch.setattr(sweep, "run_sweep", never)
    assert sweep.main([str(spec), "--outputs", str(out), "--analysis-only"]) == 2
    assert "--analysis-only: no run of tiny is done yet" in capsys.readouterr().err
    rendered = []
    monkeypatch.setattr(sweep, "render_analysis", lambda s: rendered.append(s.name) or s.root / "analysis.ipynb")
    monkeypatch.setattr(sweep.Run, "status", lambda run: "done" if run.name == "lmbda-0_seed-1" else "pending")
    assert sweep.main([str(spec), "--outputs", str(out), "--analysis-only"]) == 0
    assert rendered == ["tiny"] and "analysis of 1 of 4 runs rendered in" in capsys.readouterr().out


def _runner(spec: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "onpolicy_lib.sweep", str(spec), "--outputs", str(out), *extra]


@pytest.mark.slow
def test_sweep_end_to_end_killed_and_resumed(tmp_path, params):
    """A 2x2 sweep (lambda x seed) with evaluation: killed after its first run, resumed, analysed."""
    out = tmp_path / "out"
    eval_parameters = {"tasks": [], "perplexity_tokens": 0, "fidelity_samples": 2, "cache_dir": str(tmp_path / "c")}
    spec = write_spec(tmp_path, params=params, grid={"lmbda": [0, 1]}, seeds=[1, 2], eval=True,
                      eval_parameters=eval_parameters)
    s = expand(spec, out)
    proc = subprocess.Popen(_runner(spec, out), cwd=ROOT, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while not any(r.status() == "done" for r in s.runs):
        assert proc.poll() is None and time.time() < deadline, "the sweep ended before finishing one run"
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole runner: the sweep process and its papermill child
    proc.wait()
    time.sleep(3)  # the orphaned kernel notices its parent is gone and exits
    states = {r.name: r.status() for r in s.runs}
    done = [n for n, st in states.items() if st == "done"]
    assert 1 <= len(done) < 4 and set(states.values()) <= {"done", "interrupted", "pending"}, states
    stamps = {n: (s.root / n / "metrics.json").stat().st_mtime_ns for n in done}

    # Partial outputs collect cleanly: finished runs have metrics, the others only a status.
    partial = results.collect(out)
    assert set(partial.loc[partial["role"] == "student", "run"]) <= {r.name for r in s.runs}
    assert set(partial.loc[partial["run"].isin(done), "status"]) == {"done"}

    assert subprocess.run(_runner(spec, out), cwd=ROOT, capture_output=True, text=True).returncode == 0
    assert all(r.status() == "done" for r in s.runs)
    assert {n: (s.root / n / "metrics.json").stat().st_mtime_ns for n in done} == stamps  # never redone
    assert (s.root / "analysis.ipynb").is_file() and (s.root / "figures" / "distribution_mismatch.svg").is_file()
    for run in s.runs:
        assert (run.path / "train.ipynb").is_file() and (run.path / "eval.ipynb").is_file()
        # Rendered notebooks keep their outputs but not megabytes of progress-bar widget state.
        assert "widgets" not in json.loads((run.path / "eval.ipynb").read_text())["metadata"]

    df = results.collect(out)
    students = df[df["role"] == "student"]
    assert set(students["run"]) == {"lmbda-0_seed-1", "lmbda-0_seed-2", "lmbda-1_seed-1", "lmbda-1_seed-2"}
    assert set(students["status"]) == {"done"}
    for metric in ("forward_kl", "top1_agreement", "train_loss_final", "wall_time_s", "tokens_generated"):
        assert students["metric"].eq(metric).sum() == 4, metric
    # Every config field is a column, with the run's own values.
    row = students[(students["run"] == "lmbda-1_seed-2") & (students["metric"] == "tokens_generated")].iloc[0]
    assert row["lmbda"] == 1 and row["seed"] == 2 and row["max_steps"] == 2 and row["sweep"] == "tiny"
    assert row["value"] > 0  # on-policy runs generate
    off = students[(students["lmbda"] == 0) & (students["metric"] == "tokens_generated")]
    assert (off["value"] == 0).all()
    # Teacher and PTQ baselines appear once per sweep, not once per run.
    assert df[df["role"] == "ptq"].drop_duplicates("run")["run"].tolist() == ["PTQ int4 g32"]
    metrics_json = json.loads((s.root / "lmbda-0_seed-1" / "eval.json").read_text())
    ptq_kl = df[(df["role"] == "ptq") & (df["metric"] == "forward_kl")]["value"].item()
    # Tables weight fidelity per chat: the mean of each held-out chat's own value.
    per_chat = [ex["forward_kl"] for ex in metrics_json["baselines"]["ptq"]["fidelity"]["per_example"]]
    assert ptq_kl == pytest.approx(sum(per_chat) / len(per_chat))


@pytest.mark.slow
def test_failed_run_keeps_its_notebook_and_is_retried_only_on_request(tmp_path, params, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the hub-shaped dataset below fails fast, after expansion
    out = tmp_path / "out"
    spec = write_spec(tmp_path, params={**params, "dataset_name": "nobody/no-such-dataset"})
    s = expand(spec, out)
    (run,) = s.runs
    assert sweep.run_sweep(s, analysis=False) == {"run": "failed"}
    assert run.status() == "failed" and run.file(run.TRAIN_NOTEBOOK).is_file()
    assert "no-such-dataset" in run.file(run.ERROR).read_text() or run.file(run.RUNNER_LOG).is_file()
    stamp = run.file(run.TRAIN_NOTEBOOK).stat().st_mtime_ns
    assert sweep.run_sweep(s, analysis=False) == {"run": "failed"}  # not retried without asking
    assert run.file(run.TRAIN_NOTEBOOK).stat().st_mtime_ns == stamp
    assert sweep.run_sweep(s, retry_failed=True, analysis=False) == {"run": "failed"}
    assert (run.path / "sweep-failed-1.ipynb").is_file() and (run.path / "sweep-error-1.txt").is_file()
    table = sweep.status_table(s)
    assert table["state"].tolist() == ["failed"] and "error" in table
    assert results.collect(out)["status"].tolist() == ["failed"]


def test_shipped_specs_expand(monkeypatch):
    # Every spec in params/sweeps expands and validates (hub models: shape checks only, no download).
    monkeypatch.setattr(sweep, "_check_conflicts", lambda s: None)
    specs = sorted(p for p in (ROOT / "params" / "sweeps").glob("*.yaml") if not p.name.startswith("_"))
    assert {p.stem.split("_", 1)[1] for p in specs} >= {"lambda", "lr", "beta", "batch", "rollout", "extended",
                                                        "seeds"}
    for path in specs:
        s = expand(path, check_models=False)
        assert s.runs and s.eval, path.name


def test_analysis_with_pools_another_sweeps_runs_with_the_same_settings(tmp_path, params, monkeypatch):
    # A ladder whose int4 rung another study already trained with its settings reads those runs as its own.
    write_spec(tmp_path, "rung", params=params, grid={"lmbda": [0, 1]}, eval=True,
               eval_parameters={"tasks": []})
    ladder = expand(write_spec(tmp_path, "ladder", params=params, grid={"quant_type": ["int3", "int2"],
                                                                        "lmbda": [0, 1]},
                               eval=True, eval_parameters={"tasks": []}, analysis_with=["rung"]), tmp_path / "out")
    assert [o.name for o in ladder.analysis_with] == ["rung"] and len(ladder.analysis_with[0].runs) == 2
    rendered = {}
    monkeypatch.setattr("papermill.execute_notebook", lambda src, out, **kw: rendered.update(kw["parameters"]))
    monkeypatch.setattr(sweep, "slim_notebook", lambda path: None)
    sweep.render_analysis(ladder)
    assert rendered["outputs"] == [sweep.portable_path(tmp_path / "out" / n) for n in ("ladder", "rung")]
    assert rendered["as_sweep"] == "ladder"

    def ladder_spec(name, **extra):
        return write_spec(tmp_path, name, params=params, grid={"quant_type": ["int3", "int2"], "lmbda": [0, 1]},
                          eval=True, eval_parameters={"tasks": []}, **extra)

    write_spec(tmp_path, "other_lr", params={**params, "learning_rate": 1e-5}, grid={"lmbda": [0, 1]}, eval=True,
               eval_parameters={"tasks": []})
    with pytest.raises(SweepError, match=r"other_lr's run lmbda-0 differs .* in learning_rate \(1e-05, here 0.0001\)"):
        expand(ladder_spec("a", analysis_with=["other_lr"]), tmp_path / "out")
    write_spec(tmp_path, "other_eval", params=params, grid={"lmbda": [0, 1]}, eval=True,
               eval_parameters={"tasks": [], "limit": 7})
    with pytest.raises(SweepError, match="differs .* in eval_parameters"):
        expand(ladder_spec("b", analysis_with=["other_eval"]), tmp_path / "out")
    write_spec(tmp_path, "dup", params={**params, "quant_type": "int3"}, grid={"lmbda": [0, 1]}, eval=True,
               eval_parameters={"tasks": []})
    with pytest.raises(SweepError, match="dup's run lmbda-0 repeats this sweep's run lmbda-0_q-int3"):
        expand(ladder_spec("c", analysis_with=["dup"]), tmp_path / "out")
    with pytest.raises(SweepError, match="analysis_with must be a list of sweep names"):
        expand(ladder_spec("d", analysis_with="rung"), tmp_path / "out")


def test_as_sweep_reads_every_run_as_one_sweeps(tmp_path):
    for name, run in (("rung", "lmbda-0"), ("ladder", "q-int3_lmbda-0")):
        run_dir = tmp_path / name / run
        run_dir.mkdir(parents=True)
        (run_dir / "config.json").write_text(json.dumps({"train": {"lmbda": 0}}))
    assert {s for s, _, _ in results.find_runs(tmp_path)} == {"rung", "ladder"}
    assert {s for s, _, _ in results.find_runs([tmp_path / "ladder", tmp_path / "rung"], "ladder")} == {"ladder"}


@pytest.mark.slow
def test_baselines_only_renders_a_ptq_only_rung_with_the_sweeps_settings(tmp_path, params, capsys):
    spec = write_spec(tmp_path, params=params, grid={"lmbda": [0, 1]}, eval=True,
                      eval_parameters={"tasks": [], "perplexity_tokens": 0, "fidelity_samples": 0})
    out = tmp_path / "out"
    assert sweep.main([str(spec), "--outputs", str(out), "--baselines-only", "int9"]) == 2
    assert "--baselines-only must be one of int4, int8, int3, int2, got 'int9'" in capsys.readouterr().err
    assert sweep.main([str(spec), "--outputs", str(out), "--baselines-only", "int8"]) == 0
    rendered = out / "tiny" / "baselines-int8.ipynb"
    text = rendered.read_text()
    assert "PTQ int8 g32" in text and "teacher" in text
    record = json.loads((out / "tiny" / "baselines-int8.json").read_text())  # what the analysis reads
    assert set(record["baselines"]) == {"teacher", "ptq"}
    assert record["baselines"]["ptq"]["key"]["scheme"]["quant_type"] == "int8"
    assert sweep.main([str(spec), "--outputs", str(out), "--baselines-only", "int8"]) == 2
    assert "exists; delete it to evaluate again" in capsys.readouterr().err
    assert not [r for r in expand(spec, out).runs if r.status() != "pending"], "no run was started"
