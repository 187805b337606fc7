"""Notebooks run end to end through papermill (tiny model, no assets)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nbformat
import papermill as pm
import pytest

ROOT = Path(__file__).resolve().parents[1]
TRAIN_NB = ROOT / "notebooks" / "train.ipynb"

# The parameter names the issue fixes for train.ipynb.
REQUIRED_PARAMETERS = (
    "model_name dataset_name quant_type group_size lmbda beta temperature seq_kd learning_rate "
    "per_device_train_batch_size gradient_accumulation_steps max_steps warmup_ratio weight_decay max_length "
    "max_new_tokens min_new_tokens lora_r lora_alpha lora_dropout seed output_dir do_eval"
).split()


def test_parameters_cell_has_the_documented_names_and_defaults():
    from onpolicy_lib.config import TrainConfig

    nb = nbformat.read(TRAIN_NB, as_version=4)
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1
    namespace: dict = {}
    exec(tagged[0].source, namespace)
    params = {k: v for k, v in namespace.items() if not k.startswith("__") and k != "eval_parameters"}
    assert set(REQUIRED_PARAMETERS) <= set(params)
    # The notebook's defaults are the library's defaults: one CPU demo, not two.
    defaults = TrainConfig().to_dict()
    assert {k: v for k, v in params.items()} == {k: defaults[k] for k in params}


def test_train_notebook_end_to_end(tmp_path, tiny_model_dir, tiny_dataset_dir):
    out_dir = tmp_path / "run"
    executed = tmp_path / "train.out.ipynb"
    pm.execute_notebook(
        str(TRAIN_NB), str(executed), kernel_name="python3", cwd=str(ROOT), progress_bar=False,
        parameters={"model_name": str(tiny_model_dir), "dataset_name": str(tiny_dataset_dir),
                    "group_size": 32, "lmbda": 1, "max_steps": 3, "max_length": 96, "max_new_tokens": 6,
                    "heldout_eval_size": 4, "output_dir": str(out_dir), "device": "cpu"},
    )
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert len(metrics["steps"]) == 3 and metrics["batches_on_policy"] == 3
    assert (out_dir / "loss.png").stat().st_size > 0
    text = executed.read_text()
    assert "held-out divergence after" in text


def test_train_notebook_with_do_eval(tmp_path, tiny_model_dir, tiny_dataset_dir):
    out_dir = tmp_path / "run"
    pm.execute_notebook(
        str(TRAIN_NB), str(tmp_path / "train.out.ipynb"), kernel_name="python3", cwd=str(ROOT), progress_bar=False,
        parameters={"model_name": str(tiny_model_dir), "dataset_name": str(tiny_dataset_dir), "group_size": 32,
                    "lmbda": 1, "max_steps": 2, "max_length": 96, "max_new_tokens": 6, "heldout_eval_size": 2,
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
