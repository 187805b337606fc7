"""Figures: one training run, and the study's analysis figures (saved as PNG and SVG)."""

from __future__ import annotations

import re
import textwrap
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.colors import to_hex, to_rgb
from matplotlib.patches import Patch
from matplotlib.ticker import FixedFormatter, FixedLocator, MaxNLocator, NullLocator

from onpolicy_lib.config import format_value

# ---------------------------------------------------------------------------- colours
# The one owner of colours: every figure takes a condition's colour from condition_colors (or
# lambda_color), so a condition looks the same in all of them. Baselines are neutral greys; students
# are coloured by λ along fixed anchors from seaborn's colour-blind palette, off-policy (λ=0) blue
# to on-policy (λ=1) vermillion; λ between anchors is interpolated, so any λ always gets one colour.
TEACHER_COLOR = "#3b3b3b"
PTQ_COLOR = "#a0a0a0"
# Each quantized baseline family its own colour (greys alone were indistinguishable side by side).
GPTQ_COLOR = "#7b4ea3"
AWQ_COLOR = "#808000"
REFERENCE_COLORS = (TEACHER_COLOR, PTQ_COLOR, "#7b4ea3", "#808000")  # teacher, then baselines
BASELINE_COLORS = {"ptq": PTQ_COLOR, "gptq": GPTQ_COLOR, "awq": AWQ_COLOR}
LAMBDA_COLORS = {0.0: "#0173b2", 0.25: "#56b4e9", 0.5: "#029e73", 0.75: "#de8f05", 1.0: "#d55e00"}
# Conditions without a λ (a sweep over another parameter alone), in order of appearance.
OTHER_COLORS = ("#cc78bc", "#ca9161", "#fbafe4", "#ece133", "#949494")
# seaborn's bar plots desaturate their palette by default: they are called with saturation=1 so that
# bars show exactly these colours.
# Training batches, as loss_frame names them: all-off-policy batches are λ=0's, all-on-policy λ=1's.
BATCH_LAMBDA = {"off-policy": 0.0, "on-policy": 1.0, "mixed": 0.5}
_LAMBDA_IN_LABEL = re.compile(r"(?:^|[\s,(])(?:λ|lmbda)\s*[=-]\s*(\d+(?:\.\d*)?(?:e[+-]?\d+)?)(?![0-9A-Za-z.])")


def lambda_color(lmbda: float) -> str:
    """The colour of a student trained with this λ (fixed anchors, linear in between)."""
    anchors = sorted(LAMBDA_COLORS)
    value = float(np.clip(float(lmbda), anchors[0], anchors[-1]))
    rgb = [np.interp(value, anchors, [to_rgb(LAMBDA_COLORS[a])[i] for a in anchors]) for i in range(3)]
    return to_hex(rgb)


def label_lambda(label: str) -> float | None:
    """The λ a condition label names ("λ=0.5, lr=1e-05", "lmbda-1_seed-2", "on-policy (λ=1)"), else None."""
    match = _LAMBDA_IN_LABEL.search(label)
    if match:
        return float(match.group(1))
    return BATCH_LAMBDA.get(label.strip().lower())


def condition_colors(labels: Iterable[str], lmbda: Mapping[str, float] | None = None) -> dict[str, str]:
    """Colour (hex) of each condition label, the same in every figure.

    Labels as :func:`onpolicy_lib.analysis.condition_label` makes them: "teacher (Q4_1 GGUF)" (or
    "teacher") is dark grey, "PTQ int4 g64" light grey, GPTQ purple, AWQ olive, a student its λ's
    colour (:func:`lambda_color`,
    λ read from the label or from ``lmbda``, label -> λ, for labels such as run names that do not
    spell it); "off-policy"/"on-policy" are λ=0/λ=1. Labels with no λ get the remaining colours in
    order. Where several labels share a colour (two PTQ schemes, λ=1 at two learning rates), the
    first keeps it and the others get lighter and darker shades of it.
    """
    lmbda = lmbda or {}
    base: dict[str, str] = {}
    others = 0
    for label in dict.fromkeys(labels):
        text = str(label)
        value = lmbda.get(label)
        value = label_lambda(text) if value is None or pd.isna(value) else float(value)
        if text.lower().startswith("teacher"):
            base[label] = TEACHER_COLOR
        elif text.lower().startswith(("ptq", "gptq", "awq")):  # the quantized baselines: one colour a family
            base[label] = BASELINE_COLORS[text.split()[0].lower()]
        elif value is not None:
            base[label] = lambda_color(value)
        else:
            base[label] = OTHER_COLORS[others % len(OTHER_COLORS)]
            others += 1
    seen: dict[str, int] = {}
    colors = {}
    for label, color in base.items():
        colors[label] = _shade(color, seen.get(color, 0))
        seen[color] = seen.get(color, 0) + 1
    return colors


def _shade(color: str, i: int) -> str:
    """0: the colour itself; then alternately lighter and darker (mixed with white / black)."""
    if i == 0:
        return to_hex(color)
    amount = min(0.75, 0.35 * ((i + 1) // 2))
    target = np.ones(3) if i % 2 else np.zeros(3)
    return to_hex((1 - amount) * np.array(to_rgb(color)) + amount * target)


def _lambda_hue(w: pd.DataFrame, hue: str) -> tuple[pd.DataFrame, str, list[str], dict[str, str]]:
    """``w`` with a display column for ``hue`` (λ for lmbda), its order and its palette."""
    name = "λ" if hue == "lmbda" else hue
    data = w.copy()
    values = data[hue]
    data[name] = values.map(format_value)
    order = [format_value(v) for v in sorted(values.dropna().unique(), key=_sort_key)]
    colors = condition_colors([f"{name}={v}" for v in order])
    return data, name, order, {v: colors[f"{name}={v}"] for v in order}


def _sort_key(value: Any) -> tuple[int, Any]:
    return (0, float(value)) if isinstance(value, int | float | np.number) else (1, str(value))


def loss_frame(metrics: dict[str, Any]) -> pd.DataFrame:
    frame = pd.DataFrame(metrics["steps"])
    if frame.empty:
        return frame
    frame["batch"] = frame["on_policy_fraction"].map(
        lambda f: "on-policy" if f == 1 else ("off-policy" if f == 0 else "mixed"))
    window = max(1, len(frame) // 10)
    frame["rolling mean"] = frame["loss"].rolling(window, min_periods=1).mean()
    return frame


def plot_training(metrics: dict[str, Any], title: str = "", save_to: Path | None = None) -> plt.Figure:
    """Per-step distillation loss (points coloured by batch kind), its rolling mean, the LR, and the
    held-out divergence before and after training."""
    frame = loss_frame(metrics)
    fig, (ax, ax_lr) = plt.subplots(1, 2, figsize=(11, 3.8), gridspec_kw={"width_ratios": [3, 1]})
    if not frame.empty:
        batches = [b for b in BATCH_LAMBDA if b in set(frame["batch"])]
        sns.scatterplot(frame, x="step", y="loss", hue="batch", hue_order=batches, ax=ax, s=18, alpha=0.7,
                        palette=condition_colors(batches))
        ax.plot(frame["step"], frame["rolling mean"], color="black", lw=1.5, label="rolling mean")
        sns.lineplot(frame, x="step", y="learning_rate", ax=ax_lr, color="tab:gray")
    for key, style in (("heldout_loss_before", ":"), ("heldout_loss_after", "--")):
        if metrics.get(key) is not None:
            ax.axhline(metrics[key], color="black", ls=style, lw=1.2,
                       label=f"held-out {key.split('_')[-1]}: {metrics[key]:.4f}")
    ax.set(ylabel="generalized JSD per token", title=title or "distillation loss")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncols=3)  # below the data
    ax_lr.set(title="learning rate", ylabel="")
    fig.tight_layout()
    if save_to is not None:
        fig.savefig(save_to, dpi=120)
    return fig


def plot_eval(table: pd.DataFrame, tasks: list[str], save_to: Path | None = None) -> plt.Figure:
    """Benchmark accuracy per model (teacher, PTQ, students), one group of bars per task."""
    present = [t for t in tasks if t in table.columns]
    long = table.melt(id_vars="model", value_vars=present, var_name="task", value_name="accuracy")
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(present) + 2), 3.8))
    lmbda = dict(zip(table["model"], table["lmbda"], strict=True)) if "lmbda" in table else {}
    sns.barplot(long, x="task", y="accuracy", hue="model", ax=ax, palette=condition_colors(table["model"], lmbda),
                saturation=1)
    ax.set(title="benchmark accuracy (acc)", xlabel="", ylim=(0, 1))
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))  # beside the data, not over it
    fig.tight_layout()
    if save_to is not None:
        fig.savefig(save_to, dpi=120)
    return fig


# ---------------------------------------------------------------------------- analysis figures
def save_figure(fig: plt.Figure, figures_dir: str | Path | None, name: str) -> plt.Figure:
    """PNG (for reading) and SVG (for papers) side by side."""
    if figures_dir is not None:
        figures_dir = Path(figures_dir)
        figures_dir.mkdir(parents=True, exist_ok=True)
        # No date and fixed SVG ids: re-rendering unchanged results leaves the files unchanged in git.
        with plt.rc_context({"svg.hashsalt": "onpolicy-quant"}):
            fig.savefig(figures_dir / f"{name}.png", dpi=120, bbox_inches="tight")
            fig.savefig(figures_dir / f"{name}.svg", bbox_inches="tight", metadata={"Date": None})
    return fig


def _log_scale(values: pd.Series) -> bool:
    """A log axis where positive values span more than two orders of magnitude."""
    values = values.dropna()
    return bool(len(values) and (values > 0).all() and values.max() / values.min() > 100)


def plot_conditions(table: pd.DataFrame, names: Mapping[str, str], title: str = "", xlabel: str = "") -> plt.Figure:
    """Faceted horizontal bars: one panel per column (each on its own scale; log where the values span
    orders of magnitude), one bar per condition, ± one sd where n > 1. A table indexed by (facet,
    condition), such as ``analysis.ladder_table`` by rung, gets one row of panels per facet, so many
    conditions never crowd one bar group; conditions are named on the axis, so there is no legend."""
    faceted = isinstance(table.index, pd.MultiIndex)
    columns = list(dict.fromkeys(table.columns.get_level_values(0)))
    if faceted:
        facets = list(dict.fromkeys(table.index.get_level_values(0)))
        parts = [(facet, table.loc[facet], columns) for facet in facets]
    else:  # one facet, its panels wrapped four to a row
        parts = [(None, table, columns[i:i + 4]) for i in range(0, len(columns), 4)]
    ncols = max(len(cols) for _, _, cols in parts)
    heights = [len(part) for _, part, _ in parts]
    # Facets (rungs) share each column's axis, so a bar reads the same across rungs.
    fig, axes = plt.subplots(len(parts), ncols, squeeze=False, sharey="row", sharex="col" if faceted else False,
                             figsize=(2.9 * ncols + 1.8, sum(0.28 * h + 0.9 for h in heights) + 0.6),
                             gridspec_kw={"height_ratios": heights})
    for i, (facet, part, cols) in enumerate(parts):
        conditions = list(part.index)
        colors = condition_colors(conditions)  # per facet: each baseline family keeps its own colour
        y = np.arange(len(conditions))
        for j in range(ncols):
            ax = axes[i][j]
            if j >= len(cols):
                ax.set_visible(False)
                continue
            column = cols[j]
            mean, sd, n = part[(column, "mean")], part[(column, "sd")], part[(column, "n")]
            ax.barh(y, mean.fillna(0), xerr=sd.where(n > 1), capsize=2, color=[colors[c] for c in conditions],
                    height=0.75)
            ax.set_yticks(y, conditions, fontsize=8)
            ax.set_ylim(len(conditions) - 0.5, -0.5)  # the first condition on top (set, not toggled: shared axes)
            if _log_scale(table[(column, "mean")]):
                ax.set_xscale("log")
            ax.tick_params(axis="x", labelsize=7)
            if i == 0 or not faceted:
                ax.set_title("\n".join(textwrap.wrap(names.get(column, column), 28)), fontsize=9)
            if j == 0 and faceted:
                ax.set_ylabel(str(facet), fontsize=10, fontweight="bold")
            if xlabel and i == len(parts) - 1:
                ax.set_xlabel(xlabel, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def _reference_lines(ax: plt.Axes, metric: str, references: dict[str, dict[str, float]] | None) -> None:
    """The teacher's and baselines' levels of ``metric`` as dashed lines, labelled for the legend."""
    for i, (name, values) in enumerate((references or {}).items()):
        if metric in values and np.isfinite(values[metric]):
            ax.axhline(values[metric], color=REFERENCE_COLORS[i % len(REFERENCE_COLORS)], ls="--", lw=1, label=name)


def _panel_legend(axes: Iterable[plt.Axes]) -> dict[str, Any]:
    """Every visible panel's legend entries once (reference lines appear only in the panels they apply to)."""
    legend: dict[str, Any] = {}
    for ax in axes:
        if ax.get_visible():
            for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
                legend.setdefault(label, handle)
    return legend


def plot_against(w: pd.DataFrame, x: str, ys: dict[str, str], hue: str = "lmbda", logx: bool = False,
                 title: str = "", references: dict[str, dict[str, float]] | None = None) -> plt.Figure:
    """One panel per y: mean over seeds (line) and each seed (points) against a swept parameter;
    ``references`` ({label: {y: value}}, e.g. the teacher's and PTQ's) as dashed horizontal lines."""
    fig, axes = plt.subplots(1, len(ys), figsize=(4.2 * len(ys), 3.4), squeeze=False)
    data, hue, order, palette = _lambda_hue(w, hue)
    for ax, (y, label) in zip(axes[0], ys.items(), strict=True):
        if y not in data:
            ax.set_visible(False)
            continue
        sns.lineplot(data, x=x, y=y, hue=hue, hue_order=order, marker="o", errorbar=None, ax=ax, palette=palette)
        sns.scatterplot(data, x=x, y=y, hue=hue, hue_order=order, ax=ax, legend=False, alpha=0.4, palette=palette)
        if logx:
            ax.set_xscale("log")
            # The swept values as the ticks: a log axis's default minor labels overlap over a decade or less.
            values = sorted(data[x].dropna().unique())
            ax.xaxis.set_major_locator(FixedLocator(values))
            ax.xaxis.set_major_formatter(FixedFormatter([f"{v:g}" for v in values]))
            ax.xaxis.set_minor_locator(NullLocator())
        _reference_lines(ax, y, references)
        ax.set(ylabel=label, xlabel=x)
        if ax.get_legend() is not None:
            ax.get_legend().remove()
    legend = _panel_legend(axes[0])
    fig.legend(list(legend.values()), list(legend), title=hue, loc="upper left", bbox_to_anchor=(1.0, 0.9),
               fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_arms(runs: pd.DataFrame, metrics: dict[str, str], references: dict[str, dict[str, float]] | None = None,
              arm: str = "arm", title: str = "",
              lower_is_better: Callable[[str], bool] | None = None) -> plt.Figure:
    """One panel per metric: each run of each arm a point (its seed), the arm's mean a bar across its points,
    ``references`` ({label: {metric: value}}: the teacher, PTQ) dashed lines. ``runs``: one row per run with
    ``arm`` (its label, λ read from it for its colour) and the metrics' columns. ``lower_is_better`` (for
    example :func:`onpolicy_lib.analysis.lower_is_better`) titles each panel with its direction."""
    shown = [m for m in metrics if m in runs]
    order = list(dict.fromkeys(runs[arm]))  # the caller's order
    width = max(3.6, 0.55 * len(order) + 1.2)
    fig, axes = plt.subplots(1, len(shown), figsize=(width * len(shown), 3.4), squeeze=False)
    colors = condition_colors(order)
    for ax, metric in zip(axes[0], shown, strict=True):
        for i, name in enumerate(order):
            values = runs.loc[runs[arm] == name, metric].dropna()
            ax.scatter(np.full(len(values), i) + np.linspace(-0.12, 0.12, len(values)), values, s=22,
                       color=colors[name], alpha=0.75, zorder=3)
            if len(values):
                ax.hlines(values.mean(), i - 0.3, i + 0.3, color=colors[name], lw=2.5, zorder=4)
        _reference_lines(ax, metric, references)
        ax.set_xticks(range(len(order)), [o.replace(", ", "\n") for o in order], fontsize=8)
        ax.set(ylabel=metrics[metric], xlim=(-0.6, len(order) - 0.4))
        if lower_is_better is not None:
            ax.set_title(f"{'lower' if lower_is_better(metric) else 'higher'} is better", fontsize=8)
    legend = _panel_legend(axes[0])
    if legend:
        fig.legend(list(legend.values()), list(legend), loc="upper left", bbox_to_anchor=(1.0, 0.9), fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_loss_vs_quality(w: pd.DataFrame, quality: str, label: str, hue: str = "lmbda",
                         annotate: str = "max_steps") -> plt.Figure:
    """Final training loss against an evaluation metric, each run a point labelled by ``annotate``."""
    fig, ax = plt.subplots(figsize=(5.5, 4))
    data, hue, order, palette = _lambda_hue(w, hue)
    sns.scatterplot(data, x="train_loss_final", y=quality, hue=hue, style=hue, hue_order=order, style_order=order,
                    s=60, ax=ax, palette=palette)
    for _, row in data.iterrows():
        ax.annotate(f"{row[annotate]}", (row["train_loss_final"], row[quality]), fontsize=7,
                    xytext=(3, 3), textcoords="offset points")
    ax.set(xlabel="final training loss (mean of last 10% of steps)", ylabel=label,
           title=f"training loss vs {label} (labels: {annotate})")
    sns.move_legend(ax, "upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    fig.tight_layout()
    return fig


def plot_gap_to_teacher(gaps: pd.DataFrame) -> plt.Figure:
    """Student minus teacher accuracy per benchmark: this tool's runs beside the original study's."""
    data = gaps.copy()
    data["λ"] = data["lmbda"].map(lambda v: f"λ={v:g}")
    order = [f"λ={v:g}" for v in sorted(data["lmbda"].unique())]
    grid = sns.catplot(data, x="benchmark", y="gap", hue="λ", hue_order=order, col="study", kind="bar", height=3.6,
                       aspect=1.35, palette=condition_colors(order), saturation=1, errorbar=None, sharey=False)
    for ax in grid.axes.flat:
        ax.axhline(0, color="black", lw=0.8)
        ax.tick_params(axis="x", labelrotation=20)
    grid.set_axis_labels("", "student − teacher accuracy")
    grid.tight_layout()  # FacetGrid's own: keeps room for the legend beside the panels
    return grid.figure


def plot_metric_panels(table: pd.DataFrame, names: Mapping[str, str], title: str = "") -> plt.Figure:
    """One panel per metric (each on its own scale), one bar per condition, ± one sd over seeds."""
    return plot_conditions(table, names, title)


def plot_compute_cost(w: pd.DataFrame, quality: str, quality_label: str) -> plt.Figure:
    """Training wall time per λ (mean ± sd over seeds; hatched: the share spent in rollouts), and quality
    against wall time, each run a point."""
    data, hue, order, palette = _lambda_hue(w, "lmbda")
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    sns.barplot(data, x=hue, y="wall_time_s", hue=hue, order=order, hue_order=order, palette=palette,
                saturation=1, errorbar="sd", legend=False, ax=axes[0])
    if "rollout_seconds" in data:
        rollouts = data.groupby(hue)["rollout_seconds"].mean().reindex(order)
        axes[0].bar(range(len(order)), rollouts.fillna(0), width=0.8, color="none", edgecolor="white", hatch="///",
                    lw=0)
        axes[0].legend([Patch(facecolor="0.45", edgecolor="white", hatch="///", lw=0)], ["rollouts"], fontsize=8,
                       loc="upper center", bbox_to_anchor=(0.5, -0.15), frameon=False)  # below the bars
    axes[0].set(ylabel="training wall time (s)", title="time per run (hatched: rollouts)")
    sns.scatterplot(data, x="wall_time_s", y=quality, hue=hue, style=hue, hue_order=order, style_order=order,
                    palette=palette, s=70, ax=axes[1])
    axes[1].set(xlabel="training wall time (s)", ylabel=quality_label, title="quality vs compute")
    sns.move_legend(axes[1], "upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    fig.tight_layout()
    return fig


def _interval(ax, pos: float, row: pd.Series, color: str, vertical: bool) -> None:
    """A difference with its two intervals: the bootstrap's (thick) and the seed-level one (thin, capped);
    a filled marker where the difference is resolved; the marker alone where there is no interval."""
    def draw(low: float, high: float, **style: Any) -> None:
        if pd.isna(low) or pd.isna(high):
            return
        # Drawn from its ends, not as errors around the point: a percentile interval may exclude it.
        (ax.vlines if vertical else ax.hlines)(pos, low, high, color=color, **style)
        if style.get("lw", 1) < 2:  # caps on the seed-level interval
            ends = ([pos, pos], [low, high]) if vertical else ([low, high], [pos, pos])
            ax.plot(*ends, ls="none", marker="_" if vertical else "|", color=color, ms=8)

    draw(row.get("seed_low", np.nan), row.get("seed_high", np.nan), lw=0.9)
    draw(row["ci_low"], row["ci_high"], lw=3, alpha=0.7)
    xy = (pos, row["delta"]) if vertical else (row["delta"], pos)
    ax.plot(*xy, "o", color=color, mfc=color if row["resolved"] else "white", ms=6, zorder=3)


def _interval_legend(fig: plt.Figure) -> None:
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color="0.3", lw=3, alpha=0.7), Line2D([], [], color="0.3", lw=0.9, marker="|", ms=8),
               Line2D([], [], color="0.3", marker="o", ls="none"),
               Line2D([], [], color="0.3", marker="o", ls="none", mfc="white")]
    fig.legend(handles, ["bootstrap 95% (seeds × examples)", "seed-level 95% (Welch)", "resolved (both exclude 0)",
                         "not resolved / no seed replication"], loc="upper center", bbox_to_anchor=(0.5, 0.0),
               ncols=2, fontsize=8, frameon=False)


def _symlog_if_wide(ax: plt.Axes, values: pd.Series, axis: str, bounds: pd.Series | None = None) -> None:
    """A symmetric-log axis where signed values span more than about 1.5 orders of magnitude (linear near 0)."""
    signed = (values if bounds is None else bounds).dropna()  # what the panel draws, intervals included
    values = values.dropna().abs()
    values = values[values > 0]
    if len(values) and values.max() / values.min() > 30:
        low, high = int(np.floor(np.log10(values.min()))), int(np.ceil(np.log10(values.max())))
        (ax.set_yscale if axis == "y" else ax.set_xscale)("symlog", linthresh=10.0**low)
        # At most about four decades labelled each side of zero: a tick per decade crowds a wide panel.
        step = max(1, -(-(high - low) // 4))
        decades = [10.0**k for k in range(low, high + 1, step)]
        ticks = sorted([0.0, *decades, *(-d for d in decades)])
        (ax.set_yticks if axis == "y" else ax.set_xticks)(ticks)
        if (signed >= 0).all() or (signed <= 0).all():  # one-sided: no empty decades on the other side of zero
            pad = 10.0**low
            limits = (-pad, None) if (signed >= 0).all() else (None, pad)
            (ax.set_ylim if axis == "y" else ax.set_xlim)(*limits)


def plot_comparisons(table: pd.DataFrame, names: Mapping[str, str], title: str = "") -> plt.Figure:
    """Each comparison's difference per metric with its intervals (``analysis.compare_conditions``).

    One panel per metric (their scales differ); a zero line; the bootstrap interval thick, the seed-level
    interval thin; a filled marker where the difference is resolved. Each comparison in the colour of
    its higher-λ condition.
    """
    metrics = list(dict.fromkeys(table["metric"]))
    comparisons = list(dict.fromkeys(table["comparison"]))
    # A grid, not one row: nine long metric names side by side overlap at any readable size.
    cols = min(3, len(metrics))
    rows = -(-len(metrics) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols + 1, rows * (0.45 * len(comparisons) + 1.5)),
                             sharey=True, squeeze=False)
    for ax in axes.flat[len(metrics):]:
        ax.set_visible(False)
    for ax, metric in zip(axes.flat, metrics, strict=False):
        part = table[table["metric"] == metric].set_index("comparison").reindex(comparisons)
        for y, (label, row) in enumerate(part.iterrows()):
            if pd.isna(row["delta"]):
                continue
            _interval(ax, y, row, lambda_color(label_lambda(label.split("−")[0]) or 0.0), vertical=False)
        ax.axvline(0, color="black", lw=0.8)
        ax.set(yticks=range(len(comparisons)), yticklabels=comparisons, ylim=(len(comparisons) - 0.5, -0.5))
        ax.set_title("\n".join(textwrap.wrap(names.get(metric, metric), 34)), fontsize=9)
        ax.xaxis.set_major_locator(MaxNLocator(5))  # small differences' long tick labels overlap otherwise
        ax.tick_params(axis="x", labelsize=8)
    fig.suptitle(title or "differences with 95% intervals", fontsize=10)
    fig.tight_layout()
    _interval_legend(fig)
    return fig


def plot_ladder(effects: pd.DataFrame, names: Mapping[str, str], title: str = "", rung: str = "quant_type",
                x: str = "ptq_forward_kl") -> plt.Figure:
    """The quantization ladder in one figure (``analysis.ladder_effects``): per metric, each comparison's
    difference with its intervals against how far the rung's PTQ model sits from the teacher.

    A difference that grows with the distance is what "on-policy fixes the mismatch" predicts; a
    filled marker is resolved. A panel whose differences span orders of magnitude (perplexity) is on a
    symmetric-log axis, so the near rungs do not sit flat on zero.
    """
    metrics = list(dict.fromkeys(effects["metric"]))
    cols = min(3, len(metrics))
    rows = -(-len(metrics) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.8 * cols, 3.0 * rows), squeeze=False)
    for ax, metric in zip(axes.flat, metrics, strict=False):
        part = effects[effects["metric"] == metric]
        for comparison, rows_ in part.groupby("comparison", sort=False):
            color = lambda_color(label_lambda(comparison.split("−")[0]) or 0.0)
            rows_ = rows_.sort_values(x)
            ax.plot(rows_[x], rows_["delta"], color=color, lw=0.8, alpha=0.6)
            for _, row in rows_.iterrows():
                _interval(ax, row[x], row, color, vertical=True)
                top = max(v for v in (row["delta"], row["ci_high"], row.get("seed_high", np.nan)) if not pd.isna(v))
                ax.annotate(str(row[rung]), (row[x], top), textcoords="offset points", xytext=(0, 3),
                            ha="center", fontsize=7)
        ax.axhline(0, color="black", lw=0.8)
        bounds = [part[c] for c in ("delta", "ci_low", "ci_high", "seed_low", "seed_high") if c in part]
        _symlog_if_wide(ax, part["delta"], "y", pd.concat(bounds))
        scale = " (symlog)" if ax.get_yscale() == "symlog" else ""
        ax.set_title("\n".join(textwrap.wrap(names.get(metric, metric) + scale, 40)), fontsize=9)
        ax.set_xscale("log")
        ax.tick_params(labelsize=8)
    for ax in axes.flat[len(metrics):]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel("PTQ forward KL to the teacher (log)", fontsize=8)
    comparisons = ", ".join(dict.fromkeys(effects["comparison"]))
    fig.suptitle(title or f"{comparisons} by rung, 95% intervals", fontsize=10)
    fig.tight_layout()
    _interval_legend(fig)
    return fig


def plot_heldout_curves(curves: pd.DataFrame, title: str = "") -> plt.Figure:
    """Held-out divergence against training step, one line per run, coloured by λ; one panel per bit
    width when the runs have several (a ladder), since each rung starts from its own PTQ distance."""
    rungs = sorted(curves["quant_type"].dropna().unique(), key=str) if "quant_type" in curves else []
    panels = rungs if len(rungs) > 1 else [None]
    fig, axes = plt.subplots(1, len(panels), figsize=(max(7, 3.6 * len(panels)), 3.8), squeeze=False)
    for ax, rung in zip(axes[0], panels, strict=True):
        part_curves = curves if rung is None else curves[curves["quant_type"] == rung]
        for (_run, lmbda), part in part_curves.groupby(["run", "lmbda"], sort=True):
            ax.plot(part["step"], part["loss"], color=lambda_color(lmbda), lw=1.2, alpha=0.85, marker=".",
                    label=f"λ={format_value(lmbda)}")
        ax.set(xlabel="training step", title=str(rung) if rung is not None else "")
    handles, labels = [], []
    for ax in axes[0]:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            if label not in labels:
                handles.append(handle)
                labels.append(label)
    axes[0][0].set_ylabel("held-out divergence (dataset completions)")
    fig.suptitle(title or "held-out divergence during training")
    fig.tight_layout()
    fig.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.0, 0.9), fontsize=8)  # beside the panels
    return fig
