"""The ratios the performance targets are stated in, and the printed report.

The report's rows are data (:data:`STEP_ROWS`, :data:`GENERATION_ROWS`, :data:`RATIO_ROWS`)
rendered by one small table formatter, :func:`format_table`.
"""

from __future__ import annotations

import datetime
import json
import operator
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from onpolicy_lib.speed.breakdown import format_breakdown
from onpolicy_lib.speed.contention import format_busy
from onpolicy_lib.speed.hardware import DECODE_FORMS
from onpolicy_lib.speed.long_rollouts import format_long
from onpolicy_lib.speed.timing import CONTENDED_OTHERS, Timing


# ---------------------------------------------------------------------------- the report's name
def cpu_slug(machine: str) -> str:
    """A file-name form of the machine a report ran on: the CPU's vendor and line with its family and
    model numbers (``intel-xeon-f6m167``, ``amd-epyc-f25m17``), or the accelerator's name."""
    name = machine.split(",")[0]
    numbers = re.search(r"family (\d+), model (\d+)", machine)
    words = [w for w in re.sub(r"\(r\)|\(tm\)|processor|cpu|@.*|\(.*", " ", name.lower()).split()
             if w not in ("core",)][:2]
    slug = "-".join(re.sub(r"[^a-z0-9]+", "", w) for w in words if re.sub(r"[^a-z0-9]+", "", w))
    return (slug or "cpu") + (f"-f{numbers.group(1)}m{numbers.group(2)}" if numbers else "")


def report_stem(machine: str, date: datetime.date | None = None, kind: str = "speed") -> str:
    """``<kind>-<cpu>-<date>``: benchmark reports carry the machine in their names."""
    return f"{kind}-{cpu_slug(machine)}-{(date or datetime.date.today()).isoformat()}"


def write_report(directory: Path, stem: str, figures: dict[str, Any], text: str) -> Path:
    """``figures`` as ``<stem>.json`` and ``text`` as ``<stem>.txt`` under ``directory`` (:func:`free_stem`:
    never over an earlier report); returns the stem written."""
    path = free_stem(directory, stem)
    path.with_suffix(".json").write_text(json.dumps(figures, indent=2))
    path.with_suffix(".txt").write_text(text + "\n")
    print(f"written: {path}.txt and .json", flush=True)
    return path


def free_stem(directory: Path, stem: str) -> Path:
    """``directory/stem``, or ``stem-2``, ``stem-3``, ... where a report of that name exists (never overwritten)."""
    directory.mkdir(parents=True, exist_ok=True)
    candidate, n = directory / stem, 1
    while any(candidate.with_suffix(ext).exists() for ext in (".txt", ".json")):
        n += 1
        candidate = directory / f"{stem}-{n}"
    return candidate


# ---------------------------------------------------------------------------- targets and ratios
@dataclass(frozen=True)
class Target:
    """A bound a measured ratio should respect, e.g. ``<= 1.3``."""

    op: str  # "<=" or ">="
    bound: float

    def met(self, value: float) -> bool:
        return {"<=": operator.le, ">=": operator.ge}[self.op](value, self.bound)

    def __str__(self) -> str:
        return f"{self.op} {self.bound}"


# The performance targets, checked in the printed report (never in tests: they depend on the machine).
TARGET_OURS_VS_FLOOR = Target("<=", 1.3)  # our lambda=0 step over the floor
TARGET_LAMBDA1_VS_LAMBDA0 = Target("<=", 1.5)  # our lambda=1 step over our lambda=0 step
TARGET_TRL_SPEEDUP = Target(">=", 4.0)  # TRL's lambda=1 step over ours
TARGET_GENERATION = Target("<=", 1.3)  # plain-weight tokens/s over our student's
TARGET_DECODE = Target("<=", 2.0)  # a decode step over reading its weights once at the measured bandwidth
TARGET_EVALUATION = Target("<=", 1.5)  # a student's evaluation over the forward passes (and decoding) it needs


def ratios(timings: dict[str, Timing]) -> dict[str, float | None]:
    """Ratios of median seconds; None where a contender was not measured (``--skip-trl``)."""
    def ratio(a: str, b: str) -> float | None:
        return timings[a].median / timings[b].median if a in timings and b in timings else None

    # The arithmetic of an on-policy step: generating the tokens with plain weights, then the
    # floor on the batch they make (prompt + max_new_tokens).
    lambda1_floor = timings["gen_plain"].median + timings["floor_lambda1_shape"].median
    return {
        "ours_lambda0_over_floor": ratio("ours_0", "floor"),
        "ours_lambda1_over_lambda1_floor": timings["ours_1"].median / lambda1_floor if "ours_1" in timings else None,
        "ours_lambda1_over_ours_lambda0": ratio("ours_1", "ours_0"),
        "ours_lambda1_bf16_over_ours_lambda0": ratio("ours_1_bf16", "ours_0"),
        "trl_lambda1_over_ours_lambda1_bf16": ratio("trl_1", "ours_1_bf16"),
        "ours_lambda1_compiled_over_ours_lambda0": ratio("ours_1_compiled", "ours_0"),
        "ours_lambda1_packed_over_ours_lambda0": ratio("ours_1_packed", "ours_0"),
        "trl_lambda1_over_ours_lambda1_compiled": ratio("trl_1", "ours_1_compiled"),
        "ours_bf16train_lambda1_over_lambda0": ratio("ours_1_bf16train", "ours_0_bf16train"),
        "ours_lambda0_over_bf16train": ratio("ours_0", "ours_0_bf16train"),
        "ours_lambda1_over_bf16train": ratio("ours_1", "ours_1_bf16train"),
        "trl_lambda1_over_ours_lambda1": ratio("trl_1", "ours_1"),
        "trl_lambda0_over_ours_lambda0": ratio("trl_0", "ours_0"),
        "trl_nockpt_lambda1_over_ours_lambda1": ratio("trl_nockpt_1", "ours_1"),
        "trl_nockpt_lambda0_over_ours_lambda0": ratio("trl_nockpt_0", "ours_0"),
        "plain_over_student_tokens_per_s": ratio("gen_student", "gen_plain"),
        "plain_over_materialised_tokens_per_s": ratio("gen_materialised", "gen_plain"),
        "fake_quant_over_student_seconds": ratio("gen_fake_quant", "gen_student"),
    }


# ---------------------------------------------------------------------------- the rows
# (label, timing key, whether the rollout seconds are shown)
STEP_ROWS: tuple[tuple[str, str, bool], ...] = (
    ("(a) floor: student fwd+bwd + teacher fwd", "floor", False),
    ("    same, on the lambda=1-shaped batch", "floor_lambda1_shape", False),
    ("    optimizer alone: clip + AdamW + schedule", "optimizer", False),
    ("(b) ours, lambda=0", "ours_0", True),
    ("(b) ours, lambda=1", "ours_1", True),
    ("    ours, lambda=1, bf16 rollouts (opt-in)", "ours_1_bf16", True),
    ("    ours, lambda=1, packed rollouts", "ours_1_packed", True),
    ("    ours, lambda=1, compiled rollouts (opt-in)", "ours_1_compiled", True),
    ("    ours, lambda=0, bf16 autocast training (opt-in)", "ours_0_bf16train", True),
    ("    ours, lambda=1, bf16 autocast training (opt-in)", "ours_1_bf16train", True),
    ("(c) stock TRL GKDTrainer, lambda=0", "trl_0", True),
    ("(c) stock TRL GKDTrainer, lambda=1", "trl_1", True),
    ("    TRL, gradient_checkpointing=False, lambda=0", "trl_nockpt_0", True),
    ("    TRL, gradient_checkpointing=False, lambda=1", "trl_nockpt_1", True),
)
# (label, timing key); the generation rows show tokens/s, the quantization row does not.
GENERATION_ROWS: tuple[tuple[str, str], ...] = (
    ("plain weights (the teacher)", "gen_plain"),
    ("student, quantized once per step (our rollouts)", "gen_student"),
    ("  same, bf16 rollout (opt-in rollout_dtype)", "gen_student_bf16"),
    ("  same, weight-major decode (opt-in rollout_matmul)", "gen_student_wm"),
    ("  same, packed decode (rollout_matmul packed)", "gen_student_pk"),
    ("  same, compiled weight-major decode (rollout_compile)", "gen_student_compiled"),
    ("student, materialised for the call alone", "gen_materialised"),
    ("student, fake-quant weights (stock TRL's)", "gen_fake_quant"),
    ("quantizing all weights once (once per on-policy step)", "quantize_once"),
)
# (label, ratio key, target or None)
RATIO_ROWS: tuple[tuple[str, str, Target | None], ...] = (
    ("ours lambda=0 / floor", "ours_lambda0_over_floor", TARGET_OURS_VS_FLOOR),
    ("ours lambda=1 / ours lambda=0", "ours_lambda1_over_ours_lambda0", TARGET_LAMBDA1_VS_LAMBDA0),
    ("  same, bf16 rollouts (opt-in)", "ours_lambda1_bf16_over_ours_lambda0", TARGET_LAMBDA1_VS_LAMBDA0),
    ("  same, compiled rollouts (opt-in)", "ours_lambda1_compiled_over_ours_lambda0", TARGET_LAMBDA1_VS_LAMBDA0),
    ("  same, both in bf16 autocast training (opt-in)", "ours_bf16train_lambda1_over_lambda0",
     TARGET_LAMBDA1_VS_LAMBDA0),
    ("ours lambda=1 / (plain generation + lambda=1 floor)", "ours_lambda1_over_lambda1_floor", None),
    ("TRL lambda=1 / ours lambda=1 (speed-up)", "trl_lambda1_over_ours_lambda1", TARGET_TRL_SPEEDUP),
    ("  same, ours with bf16 rollouts (opt-in)", "trl_lambda1_over_ours_lambda1_bf16", TARGET_TRL_SPEEDUP),
    ("  same, ours with compiled rollouts (opt-in)", "trl_lambda1_over_ours_lambda1_compiled", TARGET_TRL_SPEEDUP),
    ("fp32 / bf16 autocast training step, lambda=0", "ours_lambda0_over_bf16train", None),
    ("fp32 / bf16 autocast training step, lambda=1", "ours_lambda1_over_bf16train", None),
    ("TRL lambda=0 / ours lambda=0 (speed-up)", "trl_lambda0_over_ours_lambda0", None),
    ("  same, TRL without checkpointing, lambda=1", "trl_nockpt_lambda1_over_ours_lambda1", None),
    ("  same, TRL without checkpointing, lambda=0", "trl_nockpt_lambda0_over_ours_lambda0", None),
    ("plain / our student generation tokens/s", "plain_over_student_tokens_per_s", TARGET_GENERATION),
    ("  same, weights materialised for the call", "plain_over_materialised_tokens_per_s", None),
    ("fake-quant / our student generation time", "fake_quant_over_student_seconds", None),
)


# ---------------------------------------------------------------------------- the table formatter
@dataclass(frozen=True)
class Column:
    key: str
    title: str
    width: int
    spec: str = ""  # format spec of numbers, e.g. ".2f"


def format_table(columns: Sequence[Column], rows: Sequence[dict[str, Any]]) -> list[str]:
    """Fixed-width lines: a header of the column titles, then one line per row dict.

    The first column is left-aligned, the others right-aligned; a missing or None cell is
    blank, a string is printed as is, a number with its column's format spec. A row's
    ``"note"`` is appended after its last cell.
    """
    def cell(column: Column, value: Any, first: bool) -> str:
        text = "" if value is None else value if isinstance(value, str) else format(value, column.spec)
        return f"{text:<{column.width}}" if first else f"{text:>{column.width}}"

    def line(values: dict[str, Any]) -> str:
        cells = "".join(cell(c, values.get(c.key), i == 0) for i, c in enumerate(columns))
        return cells.rstrip() + values.get("note", "")

    return [line({c.key: c.title for c in columns}), *map(line, rows)]


# ---------------------------------------------------------------------------- the report
def _step_rows(t: dict[str, Any], flag: Callable[[str], str]) -> list[dict[str, Any]]:
    rows = []
    for label, key, rollout in STEP_ROWS:
        if key not in t:
            rows.append({"label": label, "median": "skipped"})
            continue
        parts = t[key]["parts_median_s"]
        rows.append({"label": label, "median": t[key]["median_s"], "rollout": parts.get("rollout") if rollout else None,
                     "peak": t[key]["peak_mb"], "tokens": parts.get("scored_tokens"), "note": flag(key)})
    return rows


def _generation_rows(t: dict[str, Any], tokens_per_s: dict[str, float],
                     flag: Callable[[str], str]) -> list[dict[str, Any]]:
    return [{"label": label, "median": t[key]["median_s"], "rate": tokens_per_s.get(key), "peak": t[key]["peak_mb"],
             "note": flag(key)} for label, key in GENERATION_ROWS if key in t]  # older results lack new rows


def _ratio_rows(q: dict[str, float | None]) -> list[dict[str, Any]]:
    rows = []
    for label, key, target in RATIO_ROWS:
        value = q.get(key)  # None: not measured (or results written before it existed)
        met = None if value is None or target is None else ("✓" if target.met(value) else "✗")
        rows.append({"label": label, "value": "n/a" if value is None else value,
                     "target": "-" if target is None else str(target), "met": met})
    return rows


def _hardware_lines(h: dict[str, float]) -> list[str]:
    def met(value: float) -> str:
        return "✓" if TARGET_DECODE.met(value) else "✗"

    lines = [f"(e) the machine: memory read {h['read_gb_s']:.1f} GB/s; GEMM {h['gemm_fp32_gflops']:.0f} GFLOP/s fp32, "
             f"{h['gemm_bf16_gflops']:.0f} GFLOP/s bf16"]
    # Results written before a form existed lack its keys: its row is left out.
    rows = [{"label": f"decode step, {label} ({h[f'weights_mb_{key}']:.0f} MB)", "median": h[f"decode_{key}_s"],
             "read": h[f"weights_mb_{key}"] / 1e3 / h["read_gb_s"], "value": h[f"decode_{key}_over_read"],
             "target": str(TARGET_DECODE), "met": met(h[f"decode_{key}_over_read"])}
            for key, label, *_ in DECODE_FORMS if f"decode_{key}_s" in h]
    compiles = [f"{label}: compiling its step took {h[f'decode_{key}_compile_s']:.0f} s (once per run)"
                for key, label, *_ in DECODE_FORMS if f"decode_{key}_compile_s" in h]
    return lines + compiles + format_table([Column("label", "one cached decode step of the batch", 52),
                                 Column("median", "median s", 10, ".3f"), Column("read", "read s", 10, ".3f"),
                                 Column("value", "ratio", 8, ".2f"), Column("target", "target", 8),
                                 Column("met", "met", 5)], rows)


def _evaluation_lines(e: dict[str, Any]) -> list[str]:
    cfg = e["settings"]
    lines = [f"(f) a student's evaluation ({cfg['limit']} documents per benchmark, MMLU one per subject; "
             f"perplexity {cfg['perplexity_tokens']} tokens; fidelity {cfg['fidelity_samples']} held-out chats) "
             f"against the forward passes it needs: its real tokens at {e['forward_tokens_per_s']:.0f} tokens/s "
             f"(student) and {e['teacher_forward_tokens_per_s']:.0f} (teacher), its decode steps at the measured "
             "decode step"]
    rows = []
    for part in ("benchmarks", "perplexity", "fidelity", "total"):
        f = e[part]
        ratio = f["wall_over_needed"]
        rows.append({"label": part, "wall": f["wall_s"], "needed": f["needed_s"],
                     "forward": f.get("forward_s"), "generate": f.get("generate_s"),
                     "padding": (1 - f["tokens_scored"] / f["tokens_padded"]) if f.get("tokens_padded") else None,
                     "value": ratio, "target": str(TARGET_EVALUATION) if part == "total" else "",
                     "met": ("✓" if TARGET_EVALUATION.met(ratio) else "✗") if part == "total" and ratio else None})
    return lines + format_table([Column("label", "part", 14), Column("wall", "wall s", 9, ".1f"),
                                 Column("needed", "needed s", 10, ".1f"), Column("forward", "in fwd s", 10, ".1f"),
                                 Column("generate", "in gen s", 10, ".1f"), Column("padding", "padding", 9, ".0%"),
                                 Column("value", "ratio", 8, ".2f"), Column("target", "target", 8),
                                 Column("met", "met", 5)], rows)


def format_report(r: dict[str, Any]) -> str:
    """The results of :func:`onpolicy_lib.speed.run` as text: settings, three tables, load and contention."""
    s = r["settings"]
    if "busy_core" in r:  # --busy-core: that block alone
        return "\n".join([f"onpolicy-quant: a step beside a busy core\nmachine   {r['machine']}", "",
                          *format_busy(r["busy_core"])])
    t, b = r["timings"], r["batch"]
    on_cpu = s["device"].startswith("cpu")

    def flag(key: str) -> str:
        others = t[key].get("others_cores")
        return "  contended!" if on_cpu and others is not None and others > CONTENDED_OTHERS else ""

    lines = [
        "onpolicy-quant: cost of one distillation step",
        f"machine   {r['machine']}; device {s['device']}",
        f"model     {s['model']}; student {s['quant_type']} group {s['group_size']} (torchao QAT fake quantization)",
        f"batch     {s['batch_size']} real chats, {b['shape'][0]} x {b['shape'][1]} tokens (prompts "
        f"{'/'.join(map(str, b['prompt_tokens']))}, completions {'/'.join(map(str, b['completion_tokens']))}); "
        f"lambda=1 rollouts {s['max_new_tokens']} new tokens per row (min = max), beta {s['beta']}, "
        f"temperature {s['temperature']}",
        f"timing    median of {s['steps']} after {s['warmup']} warm-up "
        f"(stock TRL and fake-quant generation: {s['trl_steps']} after {min(s['warmup'], 1)})",
        "",
    ]
    label = Column("label", "step (forward, backward, optimizer)", 52)
    median, peak = Column("median", "median s", 10, ".2f"), Column("peak", "peak MB", 10, ".0f")
    if t:
        lines += format_table([label, median, Column("rollout", "rollout s", 11, ".2f"), peak,
                               Column("tokens", "tokens", 8, ".0f")], _step_rows(t, flag))
        generation = Column("label", f"(d) generation, {b['shape'][0]} x {s['max_new_tokens']} new tokens", 52)
        lines += ["", *format_table([generation, median, Column("rate", "tokens/s", 11, ".1f"), peak],
                                    _generation_rows(t, r["tokens_per_s"], flag))]
        lines += ["", *format_table([Column("label", "ratio", 52), Column("value", "measured", 10, ".2f"),
                                     Column("target", "target", 11), Column("met", "met", 6)],
                                    _ratio_rows(r["ratios"]))]
    else:
        lines.append("steps, floor and generation: skipped (--skip-steps)")

    if r.get("breakdown"):
        lines += ["", *format_breakdown(r["breakdown"])]
    if r.get("hardware"):
        lines += ["", *_hardware_lines(r["hardware"])]
    else:
        lines += ["", "hardware ceilings: skipped (--skip-hardware)"]
    if r.get("evaluation"):
        lines += ["", *_evaluation_lines(r["evaluation"])]
    if r.get("long_rollouts"):
        lines += ["", *format_long(r["long_rollouts"])]

    load = r.get("load_average") or {}
    lines.append("")
    compiling = (t.get("gen_student_compiled") or {}).get("parts_median_s", {}).get("first_rollout_compiling")
    if compiling is not None:
        lines.append(f"compiled rollouts: the first one, compiling the decode step, took {compiling:.0f} s "
                     f"(once per run; {r.get('rollout_compile_s', float('nan')):.0f} s in the step block)")
    if load.get("start") is not None:
        lines.append("load average (1/5/15 min) at start {} and end {}".format(
            "/".join(f"{x:.2f}" for x in load["start"]), "/".join(f"{x:.2f}" for x in load["end"])))
    if on_cpu and r.get("others_cores_max") is not None:
        lines.append(f"most CPU other processes took while a contender ran: {r['others_cores_max']:.2f} cores; "
                     f"above {CONTENDED_OTHERS} (flagged 'contended!') the timings measure the machine's load: "
                     "measure again alone")
    return "\n".join(lines)
