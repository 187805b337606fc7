"""The step benchmark runs end to end, and each fast path it measures equals the straightforward computation.

* ``python -m onpolicy_lib.speed`` on a tiny model: every figure is printed and positive
  (no timing assertions: the speed targets are reported by the benchmark, not tested), and
  the report has its rows, built from the figures;
* rollouts from materialised weights == rollouts from the fake-quantized forward (sampled
  tokens and every step's logits), and KV-cached logits == a full-sequence forward;
* our loss (completion block, lean divergence) == stock TRL's ``GKDTrainer.compute_loss``
  (full sequences, its collator's layout) on the same batch, losses and gradients;
* an on-policy step that quantizes each weight once == the plain step, bit for bit.
"""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
from conftest import chat_rows

from onpolicy_lib import speed
from onpolicy_lib.batches import DistillCollator, position_ids_from_mask
from onpolicy_lib.config import TrainConfig
from onpolicy_lib.distill import DistillConfig, DistillTrainer
from onpolicy_lib.quantization import fake_quantized_once, materialized_fake_quant, prepare_qat
from onpolicy_lib.rollouts import packed_available
from onpolicy_lib.speed import contenders, report
from onpolicy_lib.speed.timing import Timing
from onpolicy_lib.student import build_student

GROUP = 32

# Every row label of the printed report, table by table, header first.
STEP_LABELS = [
    "step (forward, backward, optimizer)",
    "(a) floor: student fwd+bwd + teacher fwd",
    "    same, on the lambda=1-shaped batch",
    "    optimizer alone: clip + AdamW + schedule",
    "(b) ours, lambda=0",
    "(b) ours, lambda=1",
    "    ours, lambda=1, bf16 rollouts (opt-in)",
    "    ours, lambda=1, packed rollouts",
    "    ours, lambda=1, compiled rollouts (opt-in)",
    "    ours, lambda=0, bf16 autocast training (opt-in)",
    "    ours, lambda=1, bf16 autocast training (opt-in)",
    "(c) stock TRL GKDTrainer, lambda=0",
    "(c) stock TRL GKDTrainer, lambda=1",
    "    TRL, gradient_checkpointing=False, lambda=0",
    "    TRL, gradient_checkpointing=False, lambda=1",
]
GENERATION_LABELS = [
    "(d) generation, 2 x 4 new tokens",
    "plain weights (the teacher)",
    "student, quantized once per step (our rollouts)",
    "  same, bf16 rollout (opt-in rollout_dtype)",
    "  same, weight-major decode (opt-in rollout_matmul)",
    "  same, packed decode (rollout_matmul packed)",
    "  same, compiled weight-major decode (rollout_compile)",
    "student, materialised for the call alone",
    "student, fake-quant weights (stock TRL's)",
    "quantizing all weights once (once per on-policy step)",
]
RATIO_LABELS = [
    "ratio",
    "ours lambda=0 / floor",
    "ours lambda=1 / ours lambda=0",
    "  same, bf16 rollouts (opt-in)",
    "  same, compiled rollouts (opt-in)",
    "  same, both in bf16 autocast training (opt-in)",
    "ours lambda=1 / (plain generation + lambda=1 floor)",
    "TRL lambda=1 / ours lambda=1 (speed-up)",
    "  same, ours with bf16 rollouts (opt-in)",
    "  same, ours with compiled rollouts (opt-in)",
    "fp32 / bf16 autocast training step, lambda=0",
    "fp32 / bf16 autocast training step, lambda=1",
    "TRL lambda=0 / ours lambda=0 (speed-up)",
    "  same, TRL without checkpointing, lambda=1",
    "  same, TRL without checkpointing, lambda=0",
    "plain / our student generation tokens/s",
    "  same, weights materialised for the call",
    "fake-quant / our student generation time",
]
TIMING_KEYS = {"floor", "floor_lambda1_shape", "optimizer", "ours_0", "ours_1", "ours_1_bf16", "ours_1_compiled",
               "ours_0_bf16train", "ours_1_bf16train", "trl_0", "trl_1",
               "trl_nockpt_0", "trl_nockpt_1", "gen_plain", "gen_student", "gen_student_bf16", "gen_student_wm",
               "gen_student_compiled", "gen_materialised", "gen_fake_quant", "quantize_once"} | (
                   {"ours_1_packed", "gen_student_pk"} if packed_available() else set())


def split_row(line: str) -> tuple[str, list[str]]:
    """A table line's label (up to the first double space after its text) and the figures after it."""
    label = re.match(r"\s*\S+(?: \S+)*", line).group(0)
    return label, line[len(label):].split()


def tables(printed: str) -> list[list[str]]:
    """The report's tables (the blocks after the settings block), each as its lines' labels."""
    blocks = [block.splitlines() for block in printed.split("\n\n")]
    return [[split_row(line)[0] for line in block] for block in blocks[1:4]]


def rows(printed: str) -> dict[str, list[str]]:
    return dict(split_row(line) for line in printed.splitlines() if line.strip())


# ---------------------------------------------------------------------------- end to end
def test_the_long_rollout_block_alone_and_the_report_named_for_the_cpu(tiny_model_dir, tiny_dataset_dir, tmp_path,
                                                                      capsys):
    """--skip-steps with the long-rollout block: λ=0 and λ=1 steps at its setting, the decode steps against
    their roofline at the run's batch in each fp32 form and larger ones; the report is written under the CPU's
    name."""
    from onpolicy_lib import rollouts

    results = speed.main(["--model", str(tiny_model_dir), "--dataset", str(tiny_dataset_dir), "--group-size",
                          str(GROUP), "--max-length", "64", "--min-completion-tokens", "4", "--skip-steps",
                          "--skip-trl", "--skip-eval", "--skip-hardware", "--long-new-tokens", "6",
                          "--long-max-length", "64", "--report-dir", str(tmp_path / "reports")])
    printed = capsys.readouterr().out
    long = results["long_rollouts"]
    assert long["new_tokens"] == 6 and long["lambda1_over_lambda0"] > 0
    assert long["timings"]["ours_1"]["parts_median_s"]["rollout"] > 0
    # The run's batch in each eager fp32 form this build has, then the larger batches in the fastest of them.
    forms = ["linear", "weight_major", "packed"] if rollouts.packed_available() else ["linear", "weight_major"]
    assert [(d["rows"], d["form"]) for d in long["decode"][:len(forms)]] == [(2, f) for f in forms]
    assert [d["rows"] for d in long["decode"][len(forms):]] == [4, 8]
    assert len({d["form"] for d in long["decode"][len(forms):]}) == 1
    # Each decode step is a difference of two timings: on a tiny model it may be within the timing noise, and
    # is then reported as not measured rather than as a number at or below zero.
    assert all(d["roofline_s"] > 0 for d in long["decode"])
    assert all(d["decode_step_s"] is None or (d["decode_step_s"] > 0 and d["over_roofline"] > 0)
               for d in long["decode"])
    assert "(g) long rollouts: 6 new tokens" in printed and "steps, floor and generation: skipped" in printed
    written = sorted(p.name for p in (tmp_path / "reports").iterdir())
    stem = report.report_stem(results["machine"])
    assert written == [f"{stem}.json", f"{stem}.txt"] and report.cpu_slug(results["machine"]) in stem
    assert report.free_stem(tmp_path / "reports", stem).name == f"{stem}-2"  # never overwritten


def test_the_roofline_counts_weights_kv_cache_and_arithmetic(tiny_model):
    from onpolicy_lib.speed import long_rollouts
    from onpolicy_lib.speed.hardware import weight_bytes

    weights, kv = weight_bytes(tiny_model), long_rollouts.kv_bytes_per_position(tiny_model)
    # Memory-bound (fast arithmetic): one step reads the weights and the cache so far.
    assert long_rollouts.roofline_s(tiny_model, 2, 10, 10, 1.0, 1e9) == pytest.approx((weights + 2 * kv * 10) / 1e9)
    # Compute-bound (slow arithmetic): its FLOPs over the rate.
    assert long_rollouts.roofline_s(tiny_model, 2, 10, 11, 1e9, 1e-3) == pytest.approx(
        (long_rollouts.decode_flops(tiny_model, 2, 10) + long_rollouts.decode_flops(tiny_model, 2, 11)) / 1e6)


def test_the_busy_core_block(tiny_model_dir, tiny_dataset_dir, monkeypatch):
    """A variant's process times the λ=0 step; the block reports each variant alone and beside the busy core."""
    from onpolicy_lib.speed import contention

    train = TrainConfig(model_name=str(tiny_model_dir), dataset_name=str(tiny_dataset_dir), group_size=GROUP,
                        max_length=64, min_completion_tokens=4)
    figures = contention.child({"train": train.to_dict(), "steps": 1})
    assert figures["step"] > 0 and figures["decode"] > 0 and figures["threads"] >= 1
    fake = iter([{"step": 1.0, "decode": 1.0, "threads": 2}, {"step": 20.0, "decode": 30.0, "threads": 2},
                 {"step": 1.0, "decode": 1.0, "threads": 2}, {"step": 2.2, "decode": 3.0, "threads": 2},
                 {"step": 1.1, "decode": 1.0, "threads": 2}, {"error": "over 900 s"}])
    monkeypatch.setattr(contention, "run_child", lambda *a: next(fake))
    block = contention.busy_core_figures(train.to_dict(), 1)
    assert [v["busy_over_alone"] for v in block["variants"].values()] == [
        {"step": 20.0, "decode": 30.0}, {"step": 2.2, "decode": 3.0}, {"step": None, "decode": None}]
    lines = contention.format_busy(block)
    assert "✗" in lines[2] and "✓" in lines[4] and "✗" in lines[5] and "busy: over 900 s" in lines[-1]


def test_help_shows_the_new_options(capsys):
    with pytest.raises(SystemExit):
        speed.parse_args(["--help"])
    shown = capsys.readouterr().out
    assert all(flag in shown for flag in ("--long-new-tokens", "--busy-core", "--report-dir", "--skip-steps"))


def test_speed_runs_end_to_end(tiny_model_dir, tiny_dataset_dir, tmp_path, capsys):
    out = tmp_path / "speed.json"
    results = speed.main(["--model", str(tiny_model_dir), "--dataset", str(tiny_dataset_dir), "--group-size",
                          str(GROUP), "--max-length", "64", "--min-completion-tokens", "4", "--max-new-tokens", "4",
                          "--steps", "1", "--warmup", "0",
                          "--trl-steps", "1", "--skip-eval", "--long-new-tokens", "0", "--json", str(out)])
    printed = capsys.readouterr().out
    saved = json.loads(out.read_text())
    assert saved["ratios"] == pytest.approx(results["ratios"])
    assert set(saved["timings"]) == TIMING_KEYS
    for name, timing in saved["timings"].items():
        assert len(timing["seconds"]) == 1 and timing["median_s"] > 0, name
        assert timing["peak_mb"] > 0, name
    for name in ("ours_1", "ours_1_bf16", "ours_1_compiled", "ours_1_bf16train", "trl_1",
                 "trl_nockpt_1"):  # the lambda=1 contenders really generated
        assert saved["timings"][name]["parts_median_s"]["rollout"] > 0, name
    assert saved["timings"]["ours_0"]["parts_median_s"]["rollout"] == 0
    # Equal work: every lambda=1 contender scored exactly batch x max_new_tokens completion tokens,
    # every lambda=0 contender the dataset completions.
    scored = {name: timing["parts_median_s"]["scored_tokens"] for name, timing in saved["timings"].items()
              if "scored_tokens" in timing["parts_median_s"]}
    assert (scored["ours_1"] == scored["ours_1_bf16"] == scored["ours_1_compiled"] == scored["ours_1_bf16train"]
            == scored["trl_1"] == scored["trl_nockpt_1"] == 2 * 4)
    assert (scored["ours_0"] == scored["ours_0_bf16train"] == scored["trl_0"] == scored["trl_nockpt_0"]
            == sum(saved["batch"]["completion_tokens"]))
    assert saved["timings"]["gen_student_compiled"]["parts_median_s"]["first_rollout_compiling"] > 0
    assert saved["rollout_compile_s"] > 0 and "compiled rollouts: the first one, compiling" in printed
    assert all(v > 0 for v in saved["tokens_per_s"].values())
    assert all(v is not None and v > 0 for v in saved["ratios"].values())
    assert tables(printed) == [STEP_LABELS, GENERATION_LABELS, RATIO_LABELS]
    # The machine's ceilings and the decode step against them, fp32 and bf16 (half the weight bytes).
    hardware = saved["hardware"]
    # Every rollout form: fp32 and bf16, each also weight-major (the same weights, so the same bytes).
    forms = ("fp32", "fp32_wm", "bf16", "bf16_wm", "fp32_wm_compiled")
    assert all(hardware[k] > 0 for k in ("read_gb_s", "gemm_fp32_gflops", "gemm_bf16_gflops"))
    assert all(hardware[f"decode_{f}_s"] > 0 and hardware[f"decode_{f}_over_read"] > 0 for f in forms)
    assert hardware["weights_mb_bf16"] == pytest.approx(hardware["weights_mb_fp32"] / 2)
    assert hardware["weights_mb_fp32_wm"] == hardware["weights_mb_fp32"]
    assert hardware["weights_mb_bf16_wm"] == hardware["weights_mb_bf16"]
    assert hardware["weights_mb_fp32_wm_compiled"] == hardware["weights_mb_fp32"]
    assert hardware["decode_fp32_wm_compiled_compile_s"] > 0
    assert "(e) the machine: memory read" in printed
    # Where a lambda=0 step's time goes, fp32 and bf16: the products' share of a profiled step and their bound.
    parts = saved["breakdown"]
    assert set(parts) == set(speed.BREAKDOWN.values())
    for b in parts.values():
        assert 0 < b["matmul_share"] < 1 and b["matmul_flops"] > 0 and b["matmul_bound_s"] > 0
        assert b["matmul_s"] + b["other_s"] == pytest.approx(b["step_s"]) and b["top_other"]
    assert "(b') where a lambda=0 step's time goes" in printed
    for label in ("fp32 weights (", "fp32 weights, weight-major", "bf16 weights (", "bf16 weights, weight-major",
                  "fp32, weight-major, compiled"):
        assert f"decode step, {label}" in printed, label
    for label in ("peak MB", "tokens/s", "median s", "rollout s", "measured", "target"):
        assert label in printed, label
    # The settings recorded are the demo's wherever the command line left them alone.
    demo = TrainConfig()
    assert saved["settings"]["temperature"] == demo.temperature
    assert saved["settings"]["learning_rate"] == demo.learning_rate
    assert saved["settings"]["batch_size"] == demo.per_device_train_batch_size


def test_speed_skip_trl(tiny_model_dir, tiny_dataset_dir, capsys):
    results = speed.main(["--model", str(tiny_model_dir), "--dataset", str(tiny_dataset_dir), "--group-size",
                          str(GROUP), "--max-length", "64", "--min-completion-tokens", "4", "--max-new-tokens", "2",
                          "--steps", "1", "--warmup", "0",
                          "--skip-trl", "--skip-eval", "--skip-hardware", "--long-new-tokens", "0"])
    assert "trl_1" not in results["timings"] and results["ratios"]["trl_lambda1_over_ours_lambda1"] is None
    assert "hardware" not in results and "evaluation" not in results
    printed = capsys.readouterr().out
    assert "skipped" in printed and "hardware ceilings: skipped (--skip-hardware)" in printed
    assert all(b["matmul_bound_s"] is None for b in results["breakdown"].values())  # no GEMM rate measured
    steps, _, ratios = tables(printed)
    assert steps == STEP_LABELS and ratios == RATIO_LABELS  # the same rows, marked skipped / n/a


def test_fixed_batch_is_the_first_chats_that_fit(tokenizer, tiny_dataset_dir):
    features, chats = contenders.fixed_batch(tokenizer, str(tiny_dataset_dir), 3, 64, 4)
    again, _ = contenders.fixed_batch(tokenizer, str(tiny_dataset_dir), 3, 64, 4)
    assert features == again and len(features) == 3 and len(chats) == 3
    for f, chat in zip(features, chats, strict=True):
        text = tokenizer.decode(f["completion_ids"], skip_special_tokens=True)
        assert text == chat["messages"][-1]["content"]


# ---------------------------------------------------------------------------- settings and the report
def test_settings_default_to_the_demo_and_keep_the_flags():
    defaults = speed.parse_args([])
    assert defaults.train == TrainConfig()
    settings = speed.parse_args(["--model", "m", "--dataset", "d", "--quant-type", "int8", "--group-size", "16",
                                 "--batch-size", "3", "--max-new-tokens", "5", "--max-length", "99", "--beta", "0.2",
                                 "--steps", "2", "--warmup", "0", "--trl-steps", "4", "--device", "cpu",
                                 "--threads", "1", "--skip-trl", "--seed", "7", "--json", "out.json",
                                 "--skip-eval", "--eval-limit", "5", "--skip-hardware"])
    assert settings.train == TrainConfig(model_name="m", dataset_name="d", quant_type="int8", group_size=16,
                                         per_device_train_batch_size=3, max_new_tokens=5, max_length=99, beta=0.2,
                                         device="cpu", seed=7)
    assert (settings.steps, settings.warmup, settings.trl_steps, settings.threads, settings.skip_trl,
            settings.json, settings.skip_eval, settings.eval_limit, settings.skip_hardware) == (
                2, 0, 4, 1, True, "out.json", True, 5, True)
    assert not defaults.skip_hardware
    assert set(settings.as_dict()) == {
        "model", "dataset", "quant_type", "group_size", "batch_size", "max_new_tokens", "max_length", "beta",
        "temperature", "learning_rate", "min_completion_tokens",
        "steps", "warmup", "trl_steps", "device", "threads", "skip_trl", "seed",
        "json", "skip_eval", "eval_limit", "skip_hardware", "skip_steps", "long_new_tokens", "long_max_length",
        "long_steps", "busy_core", "busy_steps", "report_dir"}
    assert (defaults.long_new_tokens, defaults.long_max_length) == (256, 768)  # the generation study's setting
    for bad in (["--steps", "0"], ["--eval-limit", "0"], ["--long-new-tokens", "800"], ["--busy-steps", "0"]):
        with pytest.raises(SystemExit):
            speed.parse_args(bad)


def fake_results(skip_trl: bool = False, contended: str | None = None) -> dict:
    """Results shaped as :func:`speed.run` returns them, from made-up timings (no model)."""
    seconds = {"floor": 1.0, "floor_lambda1_shape": 1.2, "optimizer": 0.1, "ours_0": 1.2, "ours_1": 2.0,
               "ours_1_bf16": 1.6, "ours_1_compiled": 1.5, "ours_0_bf16train": 0.8, "ours_1_bf16train": 1.0,
               "trl_0": 3.0, "trl_1": 10.0, "trl_nockpt_0": 2.5, "trl_nockpt_1": 6.0,
               "gen_plain": 0.5, "gen_student": 0.6, "gen_student_bf16": 0.4, "gen_student_wm": 0.3,
               "ours_1_packed": 1.4, "gen_student_pk": 0.25,
               "gen_student_compiled": 0.2, "gen_materialised": 0.9,
               "gen_fake_quant": 3.0, "quantize_once": 0.05}
    timings = {}
    for key, value in seconds.items():
        if skip_trl and key.startswith("trl"):
            continue
        timing = Timing(seconds=[value], peak_mb=500.0, cpu_share=0.9, others_cores=0.6 if key == contended else 0.02)
        if key.startswith(("ours", "trl")):
            timing.parts = {"rollout": [0.4 if key.endswith("1") else 0.0], "scored_tokens": [8.0]}
        timings[key] = timing
    settings = {**speed.SpeedSettings(train=TrainConfig(max_new_tokens=4)).as_dict(), "group_size": 64,
                "device": "cpu"}
    return {"settings": settings, "machine": "test machine",
            "batch": {"prompt_tokens": [10, 12], "completion_tokens": [5, 7], "shape": [2, 19]},
            "timings": {k: v.as_dict() for k, v in timings.items()},
            "tokens_per_s": {k: 8 / timings[k].median
                             for k in ("gen_plain", "gen_student", "gen_student_bf16", "gen_student_wm",
                                       "gen_student_compiled", "gen_materialised", "gen_fake_quant")},
            "hardware": {"read_gb_s": 20.0, "gemm_fp32_gflops": 100.0, "gemm_bf16_gflops": 300.0,
                         "weights_mb_fp32": 500.0, "decode_fp32_s": 0.1, "decode_fp32_over_read": 4.0,
                         "weights_mb_fp32_wm": 500.0, "decode_fp32_wm_s": 0.05, "decode_fp32_wm_over_read": 2.0,
                         "weights_mb_bf16": 250.0, "decode_bf16_s": 0.02, "decode_bf16_over_read": 1.6},
            "ratios": report.ratios(timings), "load_average": {"start": (1.0, 1.0, 1.0), "end": (2.0, 1.0, 1.0)},
            "others_cores_max": max(t.others_cores for t in timings.values())}


def test_report_has_every_row_with_its_figures():
    printed = speed.format_report(fake_results(contended="ours_1"))
    assert tables(printed) == [STEP_LABELS, GENERATION_LABELS, RATIO_LABELS]
    lines = rows(printed)
    assert lines["step (forward, backward, optimizer)"] == ["median", "s", "rollout", "s", "peak", "MB", "tokens"]
    assert lines["(a) floor: student fwd+bwd + teacher fwd"] == ["1.00", "500"]
    assert lines["(b) ours, lambda=1"] == ["2.00", "0.40", "500", "8", "contended!"]
    assert lines["(c) stock TRL GKDTrainer, lambda=0"] == ["3.00", "0.00", "500", "8"]
    assert lines["plain weights (the teacher)"] == ["0.50", "16.0", "500"]
    assert lines["quantizing all weights once (once per on-policy step)"] == ["0.05", "500"]
    assert lines["  same, weight-major decode (opt-in rollout_matmul)"] == ["0.30", "26.7", "500"]
    # Ratios against their targets: met, missed, and reported without a target.
    assert lines["ours lambda=0 / floor"] == ["1.20", "<=", "1.3", "✓"]
    assert lines["ours lambda=1 / ours lambda=0"] == ["1.67", "<=", "1.5", "✗"]
    assert lines["TRL lambda=1 / ours lambda=1 (speed-up)"] == ["5.00", ">=", "4.0", "✓"]
    assert lines["plain / our student generation tokens/s"] == ["1.20", "<=", "1.3", "✓"]
    assert lines["  same, bf16 rollouts (opt-in)"] == ["1.33", "<=", "1.5", "✓"]
    assert lines["  same, compiled rollouts (opt-in)"] == ["1.25", "<=", "1.5", "✓"]
    assert lines["  same, ours with compiled rollouts (opt-in)"] == ["6.67", ">=", "4.0", "✓"]
    assert lines["fp32 / bf16 autocast training step, lambda=1"] == ["2.00", "-"]
    assert lines["  same, both in bf16 autocast training (opt-in)"] == ["1.25", "<=", "1.5", "✓"]
    assert lines["  same, compiled weight-major decode (rollout_compile)"] == ["0.20", "40.0", "500"]
    # The hardware block: each decode step against reading its weights once at the measured bandwidth.
    assert "(e) the machine: memory read 20.0 GB/s; GEMM 100 GFLOP/s fp32, 300 GFLOP/s bf16" in printed
    assert lines["decode step, fp32 weights (500 MB)"] == ["0.100", "0.025", "4.00", "<=", "2.0", "✗"]
    assert lines["decode step, bf16 weights (250 MB)"] == ["0.020", "0.013", "1.60", "<=", "2.0", "✓"]
    assert lines["decode step, fp32 weights, weight-major (500 MB)"] == ["0.050", "0.025", "2.00", "<=", "2.0", "✓"]
    assert "bf16 weights, weight-major" not in printed  # a form the results do not have is left out
    assert lines["ours lambda=1 / (plain generation + lambda=1 floor)"] == ["1.18", "-"]
    assert "most CPU other processes took while a contender ran: 0.60 cores" in printed
    assert "load average (1/5/15 min) at start 1.00/1.00/1.00 and end 2.00/1.00/1.00" in printed


def test_report_without_trl_marks_its_rows():
    printed = speed.format_report(fake_results(skip_trl=True))
    assert tables(printed) == [STEP_LABELS, GENERATION_LABELS, RATIO_LABELS]
    lines = rows(printed)
    assert lines["(c) stock TRL GKDTrainer, lambda=1"] == ["skipped"]
    assert lines["TRL lambda=1 / ours lambda=1 (speed-up)"] == ["n/a", ">=", "4.0"]
    assert lines["  same, TRL without checkpointing, lambda=0"] == ["n/a", "-"]
    assert not any(figures[-1:] == ["contended!"] for figures in lines.values())


def test_format_table_aligns_and_leaves_missing_cells_blank():
    columns = [report.Column("name", "name", 6), report.Column("x", "x", 6, ".1f"), report.Column("y", "y", 4)]
    lines = report.format_table(columns, [{"name": "a", "x": 1.25, "y": "ok"}, {"name": "bb", "y": "-"},
                                          {"name": "c", "x": 2.0, "note": " !"}])
    assert lines == ["name       x   y", "a        1.2  ok", "bb             -", "c        2.0 !"]


# ---------------------------------------------------------------------------- rollouts
def test_materialised_rollout_equals_fake_quant_rollout(tokenizer, tiny_model):
    student = prepare_qat(copy.deepcopy(tiny_model), "int4", GROUP).eval()
    prompts = tokenizer.apply_chat_template([r["messages"][:1] for r in chat_rows(3)], add_generation_prompt=True,
                                            padding=True, return_tensors="pt", return_dict=True)
    kwargs = dict(input_ids=prompts["input_ids"], attention_mask=prompts["attention_mask"], do_sample=True,
                  temperature=0.9, top_k=0, top_p=1.0, max_new_tokens=12, min_new_tokens=12,
                  pad_token_id=tokenizer.pad_token_id, output_logits=True, return_dict_in_generate=True)

    def sample(materialise: bool):
        torch.manual_seed(5)
        with torch.no_grad(), materialized_fake_quant(student) if materialise else torch.no_grad():
            return student.generate(**kwargs)

    fast, plain = sample(True), sample(False)
    assert torch.equal(fast.sequences, plain.sequences)
    for a, b in zip(fast.logits, plain.logits, strict=True):
        assert torch.equal(a, b)  # bit for bit, every generated position

    # The KV-cached logits are those of a plain full-sequence fake-quant forward on the result.
    width = prompts["input_ids"].shape[1]
    mask = torch.cat([prompts["attention_mask"], torch.ones(3, 12, dtype=torch.long)], 1)
    with torch.no_grad():
        full = student(input_ids=fast.sequences, attention_mask=mask,
                       position_ids=position_ids_from_mask(mask)).logits
    torch.testing.assert_close(torch.stack(fast.logits, 1), full[:, width - 1:-1], rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------- ours vs stock TRL
def features_of(tokenizer, n: int = 3) -> list[dict]:
    rows = []
    for row in chat_rows(n):
        prompt = tokenizer.apply_chat_template(row["messages"][:1], add_generation_prompt=True, tokenize=True,
                                               return_dict=True)["input_ids"]
        completion = tokenizer(row["messages"][1]["content"], add_special_tokens=False)["input_ids"]
        rows.append({"prompt_ids": list(prompt), "completion_ids": completion + [tokenizer.eos_token_id]})
    rows[1]["prompt_ids"] = rows[1]["prompt_ids"][:2] + rows[1]["prompt_ids"][-5:]  # different lengths: padding
    rows[2]["completion_ids"] = rows[2]["completion_ids"][:3]
    return rows


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_our_loss_equals_stock_trl_loss(tmp_path, tokenizer, tiny_model, beta):
    features = features_of(tokenizer)
    cfg = TrainConfig(beta=beta, per_device_train_batch_size=3, max_length=128, max_new_tokens=4)
    device = torch.device("cpu")
    teacher = copy.deepcopy(tiny_model).requires_grad_(False)
    chats = chat_rows(3)

    def student():
        return build_student(tiny_model, "int4", GROUP)

    ours = contenders.our_trainer(student(), teacher, tokenizer, cfg, device, str(tmp_path / "o"), 0.0)
    trl = contenders.trl_trainer(student(), teacher, tokenizer, cfg, device, str(tmp_path / "t"), 0.0, chats)
    ours_batch = DistillCollator(tokenizer.pad_token_id)(features)
    trl_batch = contenders.trl_batch(features, tokenizer, cfg.max_length)
    # Same tokens, different layouts: ours [pad.. prompt | completion ..pad], TRL's left-padded sequences.
    assert not torch.equal(ours_batch["input_ids"], trl_batch["input_ids"])
    assert (trl_batch["labels"] != -100).sum() == (ours_batch["labels"] != -100).sum()

    loss_ours = ours.compute_loss(ours.model, ours_batch)
    loss_ours.backward()
    loss_trl = trl.compute_loss(trl.model, {k: v for k, v in trl_batch.items() if k != "byte_offsets"})
    loss_trl.backward()
    torch.testing.assert_close(loss_ours, loss_trl, rtol=1e-5, atol=1e-6)
    assert loss_ours > 0
    grads_ours = dict(ours.model.named_parameters())
    for name, p in trl.model.named_parameters():
        torch.testing.assert_close(grads_ours[name].grad, p.grad, rtol=1e-3, atol=1e-6, msg=name)


# ---------------------------------------------------------------------------- one quantization per step
def lambda1_step(tmp_path, monkeypatch, tokenizer, teacher, fast: bool, lora: bool = False):
    """One on-policy step from a fixed student and seed: the batch the loss saw, the loss, the gradients."""
    torch.manual_seed(0)
    student = build_student(teacher, "int4", GROUP, lora_r=4 if lora else None, lora_dropout=0.0)
    if not lora:
        student.requires_grad_(True)  # a copy of the frozen teacher; full fine-tuning trains every weight
    args = DistillConfig(output_dir=str(tmp_path / f"run-{fast}-{lora}"), per_device_train_batch_size=3,
                         learning_rate=1e-3, report_to=[], remove_unused_columns=False, use_cpu=True, lmbda=1.0,
                         beta=0.5, max_new_tokens=6, temperature=1.0, save_strategy="no", seed=0,
                         disable_tqdm=True, fast_rollouts=fast)
    trainer = DistillTrainer(student, teacher, args, processing_class=tokenizer)
    trainer.create_optimizer_and_scheduler(num_training_steps=1)
    trainer.current_gradient_accumulation_steps = 1
    seen, calls = {}, []
    original = trainer.compute_loss

    def spy(model, inputs, return_outputs=False, num_items_in_batch=None):
        seen.update({k: v.clone() for k, v in inputs.items()})
        return original(model, inputs, return_outputs, num_items_in_batch)

    trainer.compute_loss = spy
    quantizers = [m.weight_fake_quantizer for m in student.modules() if hasattr(m, "weight_fake_quantizer")]
    cls = type(quantizers[0])
    compute = cls.forward

    def counting(self, weight):  # counts real quantizations, not returns of a shared result
        calls.append(1)
        return compute(self, weight)

    monkeypatch.setattr(cls, "forward", counting)
    torch.manual_seed(11)
    loss = trainer.training_step(student, DistillCollator(tokenizer.pad_token_id)(features_of(tokenizer)))
    grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    assert all("forward" not in q.__dict__ for q in quantizers)  # restored after the step
    monkeypatch.setattr(cls, "forward", compute)
    return seen, loss, grads, len(calls), len(quantizers)


@pytest.mark.parametrize("lora", [False, True])
def test_on_policy_step_quantizes_once_with_identical_samples_loss_and_gradients(tmp_path, monkeypatch, tokenizer,
                                                                                   tiny_model, lora):
    teacher = copy.deepcopy(tiny_model).requires_grad_(False)
    fast = lambda1_step(tmp_path, monkeypatch, tokenizer, teacher, fast=True, lora=lora)
    plain = lambda1_step(tmp_path, monkeypatch, tokenizer, teacher, fast=False, lora=lora)
    # The straightforward path samples from the fake-quant forward (one quantization per layer
    # call: every generated token) and quantizes again in the training forward.
    assert set(fast[0]) == set(plain[0])
    for key in fast[0]:
        assert torch.equal(fast[0][key], plain[0][key]), key
    assert torch.equal(fast[1], plain[1])
    assert fast[2].keys() == plain[2].keys() and fast[2]
    for name in fast[2]:
        assert torch.equal(fast[2][name], plain[2][name]), name
    # The fast step quantized each layer's weight exactly once; the plain one at every token and again to train.
    assert fast[3] == fast[4] > 0
    assert plain[3] > 6 * fast[4]


def test_fake_quantized_once_falls_back_when_the_weight_changes(tiny_model):
    student = prepare_qat(copy.deepcopy(tiny_model), "int4", GROUP)
    layer = next(m for m in student.modules() if hasattr(m, "weight_fake_quantizer"))
    with fake_quantized_once(student) as shared:
        assert shared > 0
        first = layer.weight_fake_quantizer(layer.weight)
        assert layer.weight_fake_quantizer(layer.weight) is first  # reused
        assert layer.weight_fake_quantizer(layer.weight.detach().clone()) is not first  # another tensor
        with torch.no_grad():
            layer.weight.mul_(2)
        again = layer.weight_fake_quantizer(layer.weight)  # changed in place: computed afresh
        assert again is not first and not torch.equal(again, first)
    assert "forward" not in layer.weight_fake_quantizer.__dict__


def test_evaluation_block_sets_each_part_against_its_forward_passes(tiny_model, tokenizer, tiny_dataset_dir,
                                                                   tmp_path, monkeypatch):
    """The evaluation block times benchmarks, perplexity and fidelity of a student, counts the real
    tokens each part scores and the decode steps it takes, and the report prints it (no timing asserted)."""
    from test_benchmarks import build_fake_tree

    from onpolicy_lib import assets, quantization
    from onpolicy_lib.config import EvalConfig
    from onpolicy_lib.evaluate import fidelity_for
    from onpolicy_lib.speed import evaluation

    build_fake_tree(tmp_path / "cache", n=3)
    monkeypatch.setenv(assets.CACHE_ENV, str(tmp_path / "cache"))
    student = quantization.quantize_ptq(copy.deepcopy(tiny_model), "int4", GROUP)
    quantization.dequantize_for_eval(student)
    run_cfg = TrainConfig(dataset_name=str(tiny_dataset_dir), max_length=64, min_completion_tokens=4,
                          max_new_tokens=4).to_dict()
    eval_cfg = EvalConfig(run_dirs=[], tasks=["arc_easy", "winogrande"], limit=2, fidelity_samples=2,
                          perplexity_tokens=0, include_teacher=False, include_ptq=False)
    fidelity = fidelity_for(run_cfg, 2, tokenizer, {})
    figures = evaluation.evaluation_figures(student.eval(), tiny_model, tokenizer, eval_cfg, fidelity,
                                            torch.device("cpu"))
    bench, fid = figures["benchmarks"], figures["fidelity"]
    assert 0 < bench["tokens_scored"] <= bench["tokens_padded"] and bench["forward_calls"] > 0
    assert bench["needed_s"] > 0 and bench["wall_s"] > 0 and bench["decode_steps"] == 0
    # Fidelity: dataset completions and the two generations scored by student and teacher, and the
    # student's sampled and greedy generations (up to max_new_tokens - 1 decode steps each after prefill).
    assert fid["forward_calls"] == 2 * 3 - 1 and 0 < fid["decode_steps"] <= 2 * 3
    assert fid["needed_generation_s"] > 0 and fid["generate_s"] > 0
    assert figures["perplexity"]["needed_s"] == 0 and figures["perplexity"]["wall_over_needed"] is None
    assert figures["total"]["wall_s"] == pytest.approx(sum(figures[p]["wall_s"] for p in evaluation.PARTS))
    assert "forward" not in student.__dict__ and "generate" not in student.__dict__  # unwrapped
    printed = report._evaluation_lines(figures)
    assert printed[0].startswith("(f) a student's evaluation") and len(printed) == 2 + 4


def test_a_bf16_contender_computes_the_student_in_bf16(tiny_model_dir, tiny_dataset_dir, tmp_path):
    """The benchmark's bf16 step is what a bf16 run trains: accelerate's autocast around the student's forward
    (a Trainer adds none itself; its model must be prepared), so every matrix product runs in bf16."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from onpolicy_lib.models import load_model, load_tokenizer

    class MatmulDtypes(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.dtypes: set[torch.dtype] = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ in ("mm", "bmm", "addmm"):
                self.dtypes.add(args[-1].dtype)
            return func(*args, **(kwargs or {}))

    cfg = TrainConfig(model_name=str(tiny_model_dir), dataset_name=str(tiny_dataset_dir), group_size=GROUP,
                      max_length=64, min_completion_tokens=4)
    tokenizer = load_tokenizer(cfg.model_name)
    teacher = load_model(cfg.model_name).eval().requires_grad_(False)
    features, _ = contenders.fixed_batch(tokenizer, cfg.dataset_name, 2, cfg.max_length, cfg.min_completion_tokens)
    batch = DistillCollator(tokenizer.pad_token_id)(features)
    student = build_student(teacher, cfg.quant_type, GROUP)
    trainer = contenders.our_trainer(student, copy.deepcopy(teacher).to(torch.bfloat16), tokenizer, cfg,
                                     torch.device("cpu"), str(tmp_path), 0.0, bf16=True)
    with MatmulDtypes() as seen:
        contenders.optimisation_step(trainer, batch, torch.device("cpu"))
    assert seen.dtypes == {torch.bfloat16}
