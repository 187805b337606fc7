"""The per-CPU targets table: computed from the committed benchmark reports, and current in the docs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from onpolicy_lib.speed import targets

ZEN = "AMD EPYC (family 25, model 17), avx2/avx512f, 2 CPU cores, torch 2.13.0+cpu (2 threads)"
XEON = "Intel(R) Xeon(R) Processor (family 6, model 167), avx2/amx_bf16, 2 CPU cores, torch 2.13.0+cpu (2 threads)"


def write(directory: Path, stem: str, figures: dict) -> None:
    (directory / f"{stem}.json").write_text(json.dumps(figures))


def test_the_docs_table_is_what_the_committed_reports_give():
    doc = targets.DOC.read_text()
    assert targets.render(doc, targets.targets_table(targets.read_reports())) == doc, (
        "docs/performance.md's targets table is stale: run python -m onpolicy_lib.speed.targets --write")


def test_each_cell_is_the_latest_report_of_its_cpu_that_measured_the_target(tmp_path):
    write(tmp_path, "speed-zen4-2026-11-26", {"machine": ZEN, "ratios": {"ours_lambda0_over_floor": 1.02,
                                                                         "trl_lambda1_over_ours_lambda1": 4.5}})
    write(tmp_path, "speed-zen4-2026-11-27", {"machine": ZEN, "ratios": {"ours_lambda0_over_floor": 1.4}})
    write(tmp_path, "speed-amd-epyc-f25m17-2026-11-27-2", {"machine": ZEN, "hardware": {"decode_fp32_over_read": 1.9}})
    for count, value in ((10, 1.1), (9, 0.9)):
        write(tmp_path, f"speed-intel-xeon-f6m167-2026-12-07-{count}",
              {"machine": XEON, "ratios": {"ours_lambda0_over_floor": value}})
    write(tmp_path, "generation-intel-xeon-f6m167-2026-12-07", {
        "machine": XEON, "by_batch_size": {"8": {"decode_over_roofline": 3.2}}})
    write(tmp_path, "speed-no-machine-2026-12-07", {"ratios": {"ours_lambda0_over_floor": 9.0}})  # skipped
    (tmp_path / "wait-policy-intel-2026-12-07.json").write_text("{}")  # not a benchmark report: skipped
    table = targets.targets_table(targets.read_reports(tmp_path))
    assert table[0] == ("| target | AMD EPYC (family 25, model 17) (`amd-epyc-f25m17`) | "
                        "Intel Xeon (family 6, model 167) (`intel-xeon-f6m167`) |")

    def row(label: str) -> list[str]:
        line = next(line for line in table if line.startswith(f"| {label}"))
        return [c.strip() for c in line.strip().strip("|").split("|")][1:]

    # A later report wins (same-day reports by their count, 10 after 9), and a miss is shown as one.
    assert row("ours λ=0 / floor ≤ 1.3") == ["1.40 ✗ (`speed-zen4-2026-11-27`)",
                                            "1.10 ✓ (`speed-intel-xeon-f6m167-2026-12-07-10`)"]
    # An older report still fills a target no later one measured; an unmeasured target stays blank.
    assert row("stock TRL λ=1 / ours ≥ 4") == ["4.50 ✓ (`speed-zen4-2026-11-26`)", ""]
    assert row("a decode step, fastest fp32 form / reading its weights once ≤ 2") == [
        "1.90 ✓ (`speed-amd-epyc-f25m17-2026-11-27-2`)", ""]
    assert row("batched generation, batch 8") == ["", "3.20 ✗ (`generation-intel-xeon-f6m167-2026-12-07`)"]
    assert row("batched generation, batch 32") == ["", ""]


def test_rendering_needs_the_markers():
    with pytest.raises(ValueError, match="markers"):
        targets.render("# Performance\n", ["| target |"])


def test_the_batched_generation_benchmark_gives_what_the_table_reads(tokenizer, tiny_model):
    # The generation benchmark's figures, on the tiny model: per batch size the ratio the targets table reads,
    # and the line its report prints (stated against the same target).
    from onpolicy_lib.speed import generation

    prompts = [[20 + i, 30 + i, 40 + i][: 1 + i % 3] for i in range(6)]
    figures = generation.measure_generation(tiny_model, tokenizer, prompts, batch_sizes=[1, 4], max_new_tokens=5,
                                            bandwidth_gbs=10.0, gemm_gflops=100.0, verbose=False)
    figures["machine"] = XEON
    for size in (1, 4):
        row = figures["by_batch_size"][str(size)]
        assert row["prompts"] == size and row["generated_tokens"] == 5 * size
        assert row["decode_over_roofline"] == pytest.approx(row["decode_s"] / row["roofline_decode_s"])
        line = generation.format_row(size, row)
        assert line.startswith(f"batch {size:>3}: {size} prompts") and "(target <= 2)" in line
    row_of = targets.TARGET_ROWS[[r.label for r in targets.TARGET_ROWS].index("batched generation, batch 1: "
                                                                              "decode / roofline")]
    assert row_of.value(figures) == figures["by_batch_size"]["1"]["decode_over_roofline"]
