"""Notebooks run end to end through papermill (tiny model, no assets)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import papermill as pm
import pytest

ROOT = Path(__file__).resolve().parents[1]
TRAIN_NB = ROOT / "notebooks" / "train.ipynb"



@pytest.mark.parametrize("name", ["train.ipynb", "eval.ipynb"])
def test_parameters_cell_is_generated_from_its_dataclass(name):
    """Parameters are declared once: each notebook's cell is exactly what its dataclass generates."""
    from onpolicy_lib import config

    cls = config.NOTEBOOK_CONFIGS[name]
    source = config.notebook_parameters_source(ROOT / "notebooks" / name)
    assert source == config.parameters_cell(cls), "run `python -m onpolicy_lib.config --write-notebooks`"
    # Both directions, as papermill itself reads the cell: every field is a parameter papermill
    # knows (so it never reports "unknown parameter"), and nothing else is.
    inferred = pm.inspect_notebook(str(ROOT / "notebooks" / name))
    assert list(inferred) == cls.field_names()
    # ... with the dataclass's defaults.
    namespace: dict = {}
    exec(source, namespace)
    assert cls.from_namespace(namespace) == cls()


@pytest.mark.slow
def test_papermill_prints_nothing_a_user_must_ignore(tmp_path):
    """The kernel papermill starts (`make install` sets it up) does not warn about its local sockets."""
    import subprocess

    import nbformat

    cell = nbformat.v4.new_code_cell("a = 0")
    cell.metadata["tags"] = ["parameters"]
    nb = nbformat.v4.new_notebook(cells=[cell, nbformat.v4.new_code_cell("print(a)")])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, tmp_path / "tiny.ipynb")
    papermill = Path(sys.executable).parent / "papermill"
    done = subprocess.run([str(papermill), str(tmp_path / "tiny.ipynb"), str(tmp_path / "out.ipynb"), "-p", "a", "1",
                           "--no-progress-bar"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines() == ["Input Notebook:  " + str(tmp_path / "tiny.ipynb"),
                                        "Output Notebook: " + str(tmp_path / "out.ipynb"),
                                        "Executing notebook with kernel: python3"], done.stderr


def test_papermill_knows_every_parameter_of_the_readme_commands():
    """`-p output_dir ...` (make demo), `-p lmbda 1 -p do_eval True`, `-f` a preset: papermill warns
    "Passed unknown parameter" for any name its own inference misses (it missed `int | None` ones)."""
    from onpolicy_lib.config import load_preset

    known = set(pm.inspect_notebook(str(TRAIN_NB)))
    for given in ({"output_dir": "outputs/cpu-demo"}, {"lmbda": 1, "do_eval": True}, load_preset("qwen3_4b_study"),
                  {"group_size": 32, "lora_r": 8}):
        assert set(given) <= known


@pytest.mark.slow
def test_train_notebook_end_to_end(tmp_path, tiny_model_dir, tiny_dataset_dir):
    out_dir = tmp_path / "run"
    executed = tmp_path / "train.out.ipynb"
    pm.execute_notebook(
        str(TRAIN_NB), str(executed), kernel_name="python3", cwd=str(ROOT), progress_bar=False,
        parameters={"model_name": str(tiny_model_dir), "dataset_name": str(tiny_dataset_dir),
                    "group_size": 32, "lmbda": 1, "max_steps": 3, "max_length": 96, "max_new_tokens": 6,
                    "min_completion_tokens": 4, "heldout_eval_size": 4, "output_dir": str(out_dir), "device": "cpu"},
    )
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert len(metrics["steps"]) == 3 and metrics["batches_on_policy"] == 3
    assert (out_dir / "loss.png").stat().st_size > 0
    text = executed.read_text()
    assert "held-out divergence after" in text


@pytest.mark.slow
def test_train_notebook_with_do_eval(tmp_path, tiny_model_dir, tiny_dataset_dir):
    out_dir = tmp_path / "run"
    pm.execute_notebook(
        str(TRAIN_NB), str(tmp_path / "train.out.ipynb"), kernel_name="python3", cwd=str(ROOT), progress_bar=False,
        parameters={"model_name": str(tiny_model_dir), "dataset_name": str(tiny_dataset_dir), "group_size": 32,
                    "lmbda": 1, "max_steps": 2, "max_length": 96, "max_new_tokens": 6,
                    "min_completion_tokens": 4, "heldout_eval_size": 2,
                    "output_dir": str(out_dir), "device": "cpu", "do_eval": True,
                    "eval_parameters": {"tasks": [], "perplexity_tokens": 0, "fidelity_samples": 2,
                                        "cache_dir": str(tmp_path / "cache")}},
    )
    record = json.loads((out_dir / "eval.json").read_text())
    assert record["student"]["fidelity"]["examples"] == 2
    assert (out_dir / "eval.ipynb").is_file()


def test_bad_parameter_fails_before_loading_anything(tmp_path):
    with pytest.raises(pm.PapermillExecutionError, match="lmbda must be a number in \\[0, 1\\]"):
        pm.execute_notebook(str(TRAIN_NB), str(tmp_path / "bad.ipynb"), kernel_name="python3",
                            cwd=str(ROOT), progress_bar=False,
                            parameters={"lmbda": 1.5, "output_dir": str(tmp_path / "never")})
    assert not (tmp_path / "never").exists()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
