"""Every figure renders from small synthetic frames, and a condition has one colour in all of them."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from matplotlib.collections import Collection
from matplotlib.colors import to_hex, to_rgb
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from onpolicy_lib import analysis, plots

LAMBDAS = (0, 0.5, 1)
NAMES = {"arc_easy/acc": "ARC-Easy", "mmlu/acc": "MMLU", "average": "Average"}


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def rgb(color) -> str:
    """A colour without its alpha, comparable across artists (bars, points, lines, legend handles)."""
    return to_hex(to_rgb(np.asarray(color, dtype=float).ravel()[:3] if not isinstance(color, str) else color))


def expected(label: str) -> str:
    return rgb(plots.condition_colors([label])[label])


def handle_color(handle) -> str:
    if isinstance(handle, Patch):
        return rgb(handle.get_facecolor())
    if isinstance(handle, Line2D):
        face = handle.get_markerfacecolor()
        return rgb(handle.get_color() if handle.get_linestyle() not in ("None", "", " ") else face)
    if isinstance(handle, Collection):
        return rgb(handle.get_facecolor()[0])
    raise TypeError(type(handle))


def legend_colors(fig: plt.Figure) -> dict[str, str]:
    """label -> colour of every legend entry in ``fig``; bare values under a "λ" title become "λ=value"."""
    legends = [*fig.legends, *(ax.get_legend() for ax in fig.axes)]
    out = {}
    for legend in filter(None, legends):
        title = legend.get_title().get_text()
        for handle, text in zip(legend.legend_handles, legend.get_texts(), strict=True):
            label = text.get_text()
            if title == "λ" and not label.startswith("λ"):
                label = f"λ={label}"
            out[label] = handle_color(handle)
    return out


# ---------------------------------------------------------------------------- synthetic frames
def condition_table(conditions: list[str]) -> pd.DataFrame:
    """condition x (column, stat) as analysis.condition_table returns it."""
    rng = np.random.default_rng(0)
    data = {}
    for column in NAMES:
        data[(column, "mean")] = rng.uniform(0.3, 0.6, len(conditions))
        data[(column, "sd")] = rng.uniform(0, 0.02, len(conditions))
        data[(column, "n")] = [1 if not c.startswith("λ") else 3 for c in conditions]
    return pd.DataFrame(data, index=pd.Index(conditions, name="condition"))


def students() -> pd.DataFrame:
    rows = []
    for lmbda in LAMBDAS:
        for seed in (1, 2):
            for lr, steps in ((1e-5, 10), (1e-4, 20)):
                rows.append({"role": "student", "lmbda": float(lmbda), "seed": seed, "learning_rate": lr,
                             "max_steps": steps, "average": 0.4 + 0.01 * seed + 0.02 * lmbda,
                             "train_loss_final": 0.1 / seed + lmbda, "forward_kl": 0.2 - 0.05 * lmbda,
                             "wall_time_s": 100 + 80 * lmbda + seed, "rollout_seconds": 60 * lmbda})
    return pd.DataFrame(rows)


def training_metrics() -> dict:
    steps = [{"step": i, "loss": 1 / (i + 1), "learning_rate": 1e-5, "on_policy_fraction": [0.0, 1.0, 0.5][i % 3]}
             for i in range(12)]
    return {"steps": steps, "heldout_loss_before": 0.3, "heldout_loss_after": 0.2}


def gaps() -> pd.DataFrame:
    rows = [{"study": study, "lmbda": lmbda, "benchmark": bench, "gap": -0.01 * (i + 1)}
            for study, lmbdas in (("ours", (0, 1)), ("original", LAMBDAS))
            for lmbda in lmbdas for i, bench in enumerate(("ARC-Easy", "MMLU"))]
    return pd.DataFrame(rows)


def eval_table() -> pd.DataFrame:
    return pd.DataFrame([
        {"model": "teacher", "arc_easy": 0.5, "mmlu": 0.3},
        {"model": "PTQ int4 g64", "arc_easy": 0.45, "mmlu": 0.28},
        {"model": "lmbda-0_seed-1", "lmbda": 0.0, "arc_easy": 0.47, "mmlu": 0.29},
        {"model": "lmbda-1_seed-1", "lmbda": 1.0, "arc_easy": 0.48, "mmlu": 0.29},
    ])


def bar_colors(fig: plt.Figure) -> dict[str, str]:
    """condition -> colour of the horizontal bars of a faceted figure, one colour per condition."""
    colors: dict[str, str] = {}
    for ax in fig.axes:
        row = [a for a in fig.axes if a.get_subplotspec().rowspan == ax.get_subplotspec().rowspan]
        labels = [t.get_text() for t in row[0].get_yticklabels()]  # panels of a row share the first's labels
        for label, patch in zip(labels, ax.patches, strict=True):
            assert colors.setdefault(label, rgb(patch.get_facecolor())) == rgb(patch.get_facecolor()), label
    return colors


# ---------------------------------------------------------------------------- per figure
def figure_colors() -> dict[str, dict[str, str]]:
    """figure name -> condition -> colour, read off the artists of each figure."""
    out: dict[str, dict[str, str]] = {}
    conditions = ["teacher (Q4_1 GGUF)", "PTQ int4 g64", "λ=0", "λ=0.5", "λ=1"]

    for name, fig in (("conditions", plots.plot_conditions(condition_table(conditions), NAMES, "main")),
                      ("metric_panels", plots.plot_metric_panels(condition_table(conditions), NAMES, "fidelity"))):
        out[name] = bar_colors(fig)

    fig = plots.plot_gap_to_teacher(gaps())
    out["gap"] = legend_colors(fig)
    gap_bars = {rgb(p.get_facecolor()) for ax in fig.axes for p in ax.patches if p.get_height() != 0}
    assert gap_bars == set(out["gap"].values())

    fig = plots.plot_training(training_metrics())
    out["training"] = {k: v for k, v in legend_colors(fig).items() if k in plots.BATCH_LAMBDA}
    frame = plots.loss_frame(training_metrics())
    points = next(c for c in fig.axes[0].collections if len(c.get_offsets()) == len(frame))
    for batch, face in zip(frame["batch"], points.get_facecolors(), strict=True):
        assert rgb(face) == out["training"][batch]

    w = students()
    fig = plots.plot_against(w, "learning_rate", {"average": "avg", "forward_kl": "kl"}, logx=True)
    out["against"] = legend_colors(fig)
    line_colors = {rgb(line.get_color()) for ax in fig.axes for line in ax.get_lines() if len(line.get_xdata())}
    assert line_colors == set(out["against"].values())

    fig = plots.plot_loss_vs_quality(w, "average", "benchmark average")
    out["loss_vs_quality"] = legend_colors(fig)
    point_colors = {rgb(f) for c in fig.axes[0].collections for f in c.get_facecolors()}
    assert point_colors == set(out["loss_vs_quality"].values())

    fig = plots.plot_compute_cost(w, "average", "benchmark average")
    ax_time, ax_quality = fig.axes
    ticks = [f"λ={t.get_text()}" for t in ax_time.get_xticklabels()]
    filled = [p for p in ax_time.patches if p.get_fill() and p.get_facecolor()[3] > 0]
    out["compute_cost_bars"] = {t: rgb(p.get_facecolor()) for t, p in zip(ticks, filled, strict=True)}
    out["compute_cost_points"] = {k: v for k, v in legend_colors(fig).items() if k.startswith("λ")}

    fig = plots.plot_eval(eval_table(), ["arc_easy", "mmlu"])
    out["eval"] = legend_colors(fig)
    return out


def test_condition_colors_fixed_mapping():
    colors = plots.condition_colors(["teacher (Q4_1 GGUF)", "PTQ int4 g64", "λ=0", "λ=0.5", "λ=1"])
    assert colors == {"teacher (Q4_1 GGUF)": plots.TEACHER_COLOR, "PTQ int4 g64": plots.PTQ_COLOR,
                      "λ=0": plots.LAMBDA_COLORS[0.0], "λ=0.5": plots.LAMBDA_COLORS[0.5],
                      "λ=1": plots.LAMBDA_COLORS[1.0]}
    # A λ's colour depends on nothing else: not on the order, nor on which other conditions are shown.
    assert plots.condition_colors(["λ=1", "λ=0"]) == {"λ=1": colors["λ=1"], "λ=0": colors["λ=0"]}
    assert len(set(colors.values())) == len(colors)
    # Every way a figure names λ=0 / λ=1.
    for label in ("λ=0", "lmbda-0_seed-3", "off-policy", "off-policy (λ=0)", "λ=0, lr=1e-05"):
        assert plots.condition_colors([label])[label] == colors["λ=0"], label
    for label in ("λ=1", "lmbda-1_seed-2", "on-policy", "on-policy (λ=1)", "λ=1, β=0.5"):
        assert plots.condition_colors([label])[label] == colors["λ=1"], label
    assert plots.condition_colors(["run"], {"run": 1.0})["run"] == colors["λ=1"]
    # analysis.condition_label's own labels.
    row = pd.Series({"role": "student", "lmbda": 1.0, "learning_rate": 1e-5})
    label = analysis.condition_label(row, ["lmbda"])
    assert label == "λ=1" and plots.condition_colors([label])[label] == colors["λ=1"]


def test_conditions_sharing_a_colour_get_distinct_shades():
    labels = ["PTQ int4 g64", "PTQ int8 g64", "GPTQ int4 g64", "AWQ int4 g64", "λ=1, lr=1e-05", "λ=1, lr=0.0001",
              "λ=1, lr=0.001", "lr=1", "lr=2"]
    colors = plots.condition_colors(labels)
    assert len(set(colors.values())) == len(labels)
    assert colors["PTQ int4 g64"] == plots.PTQ_COLOR and colors["λ=1, lr=1e-05"] == plots.LAMBDA_COLORS[1.0]
    assert plots.lambda_color(0.3) not in colors.values()
    assert plots.lambda_color(0.5) == plots.LAMBDA_COLORS[0.5]


def test_a_condition_has_one_colour_in_every_figure():
    figures = figure_colors()
    lambda_0, lambda_1 = expected("λ=0"), expected("λ=1")
    names = {"off-policy": "λ=0", "on-policy": "λ=1", "mixed": "λ=0.5", "lmbda-0_seed-1": "λ=0",
             "lmbda-1_seed-1": "λ=1", "teacher": "teacher (Q4_1 GGUF)"}
    seen: dict[str, dict[str, str]] = {}
    for figure, colors in figures.items():
        assert colors, figure
        for label, color in colors.items():
            seen.setdefault(names.get(label, label), {})[figure] = color
    for condition, by_figure in seen.items():
        assert len(set(by_figure.values())) == 1, (condition, by_figure)
        assert set(by_figure.values()) == {expected(condition)}, (condition, by_figure)
    # λ=0 and λ=1 appear in every figure, with their fixed colours.
    for figure in figures:
        assert seen["λ=0"][figure] == lambda_0 and seen["λ=1"][figure] == lambda_1, figure
    assert lambda_0 == plots.LAMBDA_COLORS[0.0] and lambda_1 == plots.LAMBDA_COLORS[1.0]
    assert seen["teacher (Q4_1 GGUF)"].keys() == {"conditions", "metric_panels", "eval"}


def test_figures_save_png_and_svg(tmp_path):
    fig = plots.plot_compute_cost(students(), "average", "benchmark average")
    plots.save_figure(fig, tmp_path, "compute_cost")
    assert (tmp_path / "compute_cost.png").stat().st_size > 0 and (tmp_path / "compute_cost.svg").stat().st_size > 0


def test_heldout_curves_of_a_ladder_get_one_panel_per_bit_width():
    rows = [{"run": f"{q}-{lmbda}", "lmbda": lmbda, "quant_type": q, "step": step, "loss": 0.1 / (1 + step)}
            for q in ("int2", "int4") for lmbda in (0, 1) for step in (0, 25, 50)]
    fig = plots.plot_heldout_curves(pd.DataFrame(rows))
    assert [ax.get_title() for ax in fig.axes] == ["int2", "int4"]
    assert all(len(ax.get_lines()) == 2 for ax in fig.axes)
    one_rung = plots.plot_heldout_curves(pd.DataFrame([r for r in rows if r["quant_type"] == "int4"]))
    assert len(one_rung.axes) == 1 and len(one_rung.axes[0].get_lines()) == 2
    plt.close("all")


def test_comparisons_wrap_into_a_grid_with_readable_titles():
    metrics = ["average", "forward_kl", "forward_kl_matched", "reverse_kl_on_policy"]
    table = pd.DataFrame([{"comparison": "λ=1 − λ=0", "metric": m, "delta": 0.02, "ci_low": 0.01, "ci_high": 0.03,
                           "resolved": True} for m in metrics])
    names = {**NAMES, **analysis.FIDELITY_NAMES}
    fig = plots.plot_comparisons(table, names)
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert len(fig.axes) == 6 and len(visible) == 4  # 2 rows of 3, the spare panels hidden
    titles = [ax.get_title() for ax in visible]
    assert titles[0] == "Average" and titles[2].replace("\n", " ") == names["forward_kl_matched"]
    assert all(len(line) <= 34 for title in titles for line in title.split("\n"))


def test_baseline_families_have_their_own_colours():
    colors = plots.condition_colors(["PTQ int2 g64", "GPTQ int2 g64", "AWQ int2 g64", "teacher (Q5_0 GGUF)"])
    assert list(colors.values()) == [plots.PTQ_COLOR, plots.GPTQ_COLOR, plots.AWQ_COLOR, plots.TEACHER_COLOR]


def test_many_conditions_are_faceted_by_rung_on_log_scales_where_they_span_orders():
    rungs = {"int4": ("teacher", "PTQ int4 g64", "GPTQ int4 g64", "λ=0", "λ=1"),
             "int2": ("teacher", "PTQ int2 g64", "GPTQ int2 g64", "λ=0", "λ=1")}
    parts = {}
    for q, conditions in rungs.items():
        table = condition_table(list(conditions))
        table[("average", "mean")] = [36.0, 5e9, 2e5, 1e4, 1e7] if q == "int2" else [36, 56, 47, 49, 48]
        parts[q] = table
    table = pd.concat(parts, names=["quant_type", "condition"])
    fig = plots.plot_conditions(table, NAMES)
    assert len(fig.axes) == 2 * 3  # a row of panels per rung, a panel per column
    assert [ax.get_ylabel() for ax in fig.axes[::3]] == ["int4", "int2"]
    assert fig.axes[2].get_xscale() == "log" and fig.axes[0].get_xscale() == "linear"
    assert bar_colors(fig)["GPTQ int2 g64"] == plots.GPTQ_COLOR  # each facet's baselines keep their colour


def test_the_ladders_wide_panel_is_symmetric_log_and_legends_sit_outside_the_data():
    rows = []
    for q, kl, ppl in (("int4", 0.5, -0.95), ("int3", 3.1, -8.4), ("int2", 29.0, -1.7e8)):
        for metric, delta in (("perplexity", ppl), ("forward_kl", 0.05 + 0.001 * kl)):
            rows.append({"quant_type": q, "ptq_forward_kl": kl, "comparison": "λ=1 − λ=0", "metric": metric,
                         "delta": delta, "ci_low": delta - abs(delta) / 2, "ci_high": delta + abs(delta) / 2,
                         "seed_low": delta - abs(delta), "seed_high": delta + abs(delta) * 0.9, "resolved": True})
    fig = plots.plot_ladder(pd.DataFrame(rows), {"perplexity": "perplexity"})
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert panels[0].get_yscale() == "symlog" and panels[1].get_yscale() == "linear"
    fig.canvas.draw()
    legend = fig.legends[0].get_window_extent()
    assert not any(legend.overlaps(ax.get_window_extent()) for ax in panels)


def test_a_comparison_without_seed_replication_draws_no_interval():
    table = pd.DataFrame([{"comparison": "λ=1 − λ=0", "metric": "forward_kl", "delta": 0.05, "ci_low": np.nan,
                           "ci_high": np.nan, "seed_low": np.nan, "seed_high": np.nan, "resolved": False}])
    fig = plots.plot_comparisons(table, {})
    ax = fig.axes[0]
    assert not ax.collections and not ax.containers  # no error bars
    markers = [line for line in ax.get_lines() if line.get_marker() == "o"]
    assert len(markers) == 1 and markers[0].get_markerfacecolor() == "white"


def test_arm_panels_say_which_direction_is_better():
    runs = pd.DataFrame({"arm": ["λ=0, 100 steps", "λ=0, 100 steps", "λ=1, 100 steps"],
                         "gen_greedy/teacher_nll": [0.4, 0.42, 0.39], "gen_greedy/rouge_l": [0.19, 0.2, 0.21]})
    panel = {"gen_greedy/teacher_nll": "teacher NLL", "gen_greedy/rouge_l": "ROUGE-L"}
    fig = plots.plot_arms(runs, panel, {"teacher": {"gen_greedy/teacher_nll": 0.3}},
                          lower_is_better=analysis.lower_is_better)
    assert [ax.get_title() for ax in fig.axes] == ["lower is better", "higher is better"]
    assert [ax.get_title() for ax in plots.plot_arms(runs, panel).axes] == ["", ""]  # no direction unless asked
