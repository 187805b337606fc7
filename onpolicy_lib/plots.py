"""Figures: one training run, and the study's analysis figures (saved as PNG and SVG)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns

from onpolicy_lib.analysis import format_value


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
        sns.scatterplot(frame, x="step", y="loss", hue="batch", ax=ax, s=18, alpha=0.7,
                        palette={"on-policy": "tab:red", "off-policy": "tab:blue", "mixed": "tab:purple"})
        ax.plot(frame["step"], frame["rolling mean"], color="black", lw=1.5, label="rolling mean")
        sns.lineplot(frame, x="step", y="learning_rate", ax=ax_lr, color="tab:gray")
    for key, style in (("heldout_loss_before", ":"), ("heldout_loss_after", "--")):
        if metrics.get(key) is not None:
            ax.axhline(metrics[key], color="tab:green", ls=style, lw=1.2,
                       label=f"held-out {key.split('_')[-1]}: {metrics[key]:.4f}")
    ax.set(ylabel="generalized JSD per token", title=title or "distillation loss")
    ax.legend(fontsize=8)
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
    sns.barplot(long, x="task", y="accuracy", hue="model", ax=ax)
    ax.set(title="benchmark accuracy (acc)", xlabel="", ylim=(0, 1))
    ax.legend(fontsize=8, loc="upper right")
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


def _long(table: pd.DataFrame, names: dict[str, str]) -> pd.DataFrame:
    """condition x (column, stat) table -> long rows with mean and sd."""
    rows = []
    for condition, row in table.iterrows():
        for column in dict.fromkeys(table.columns.get_level_values(0)):
            rows.append({"condition": condition, "column": names.get(column, column),
                         "mean": row[(column, "mean")], "sd": row[(column, "sd")], "n": row[(column, "n")]})
    return pd.DataFrame(rows)


def plot_conditions(table: pd.DataFrame, names: dict[str, str], title: str, ylabel: str,
                    ylim: tuple[float, float] | None = None) -> plt.Figure:
    """Grouped bars (one group per column, one bar per condition), ± one sd over seeds where n > 1."""
    long = _long(table, names)
    conditions = list(dict.fromkeys(long["condition"]))
    columns = list(dict.fromkeys(long["column"]))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.5 * len(columns) + 2), 3.8))
    width = 0.8 / max(1, len(conditions))
    colors = sns.color_palette("colorblind", len(conditions))
    for i, condition in enumerate(conditions):
        sub = long[long["condition"] == condition].set_index("column").reindex(columns)
        x = [j + (i - (len(conditions) - 1) / 2) * width for j in range(len(columns))]
        err = sub["sd"].where(sub["n"] > 1)
        ax.bar(x, sub["mean"], width, yerr=err, capsize=2, label=condition, color=colors[i])
    ax.set_xticks(range(len(columns)), columns)
    ax.set(title=title, ylabel=ylabel)
    if ylim:
        ax.set_ylim(*ylim)
    ax.legend(fontsize=8, ncols=2)
    fig.tight_layout()
    return fig


def plot_against(w: pd.DataFrame, x: str, ys: dict[str, str], hue: str = "lmbda", logx: bool = False,
                 title: str = "") -> plt.Figure:
    """One panel per y: mean over seeds (line) and each seed (points) against a swept parameter."""
    fig, axes = plt.subplots(1, len(ys), figsize=(4.2 * len(ys), 3.4), squeeze=False)
    data = w.copy()
    data[hue] = data[hue].map(format_value)
    for ax, (y, label) in zip(axes[0], ys.items(), strict=True):
        if y not in data:
            ax.set_visible(False)
            continue
        sns.lineplot(data, x=x, y=y, hue=hue, marker="o", errorbar=None, ax=ax, palette="colorblind")
        sns.scatterplot(data, x=x, y=y, hue=hue, ax=ax, legend=False, alpha=0.4, palette="colorblind")
        if logx:
            ax.set_xscale("log")
        ax.set(ylabel=label, xlabel=x)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_loss_vs_quality(w: pd.DataFrame, quality: str, label: str, hue: str = "lmbda",
                         annotate: str = "max_steps") -> plt.Figure:
    """Final training loss against an evaluation metric, each run a point labelled by ``annotate``."""
    fig, ax = plt.subplots(figsize=(5.5, 4))
    data = w.copy()
    data[hue] = data[hue].map(format_value)
    sns.scatterplot(data, x="train_loss_final", y=quality, hue=hue, style=hue, s=60, ax=ax, palette="colorblind")
    for _, row in data.iterrows():
        ax.annotate(f"{row[annotate]}", (row["train_loss_final"], row[quality]), fontsize=7,
                    xytext=(3, 3), textcoords="offset points")
    ax.set(xlabel="final training loss (mean of last 10% of steps)", ylabel=label,
           title=f"training loss vs {label} (labels: {annotate})")
    fig.tight_layout()
    return fig


def plot_bootstrap(result, title: str = "") -> plt.Figure:  # result: analysis.BootstrapResult
    """The bootstrap distribution of the paired difference, its 95% interval and zero."""
    fig, ax = plt.subplots(figsize=(6, 3.4))
    sns.histplot(100 * result.samples, bins=60, ax=ax, color="tab:gray")
    for value, style in ((result.ci_low, "--"), (result.ci_high, "--"), (result.delta, "-")):
        ax.axvline(100 * value, color="tab:blue", ls=style, lw=1.2)
    ax.axvline(0, color="black", lw=1)
    ax.set(xlabel=f"{result.b} − {result.a} (accuracy points, benchmark average)", ylabel="bootstrap draws",
           title=title or f"paired bootstrap: p = {result.p_value:.3f}")
    fig.tight_layout()
    return fig


def plot_gap_to_teacher(gaps: pd.DataFrame) -> plt.Figure:
    """Student minus teacher accuracy per benchmark: this tool's runs beside the original study's."""
    data = gaps.copy()
    data["λ"] = data["lmbda"].map(lambda v: f"λ={v:g}")
    grid = sns.catplot(data, x="benchmark", y="gap", hue="λ", col="study", kind="bar", height=3.6, aspect=1.35,
                       palette="colorblind", errorbar=None, sharey=False)
    for ax in grid.axes.flat:
        ax.axhline(0, color="black", lw=0.8)
        ax.tick_params(axis="x", labelrotation=20)
    grid.set_axis_labels("", "student − teacher accuracy")
    grid.figure.tight_layout()
    return grid.figure


def plot_metric_panels(table: pd.DataFrame, names: dict[str, str], title: str = "") -> plt.Figure:
    """One panel per metric (each on its own scale), one bar per condition, ± one sd over seeds."""
    long = _long(table, names)
    columns = list(dict.fromkeys(long["column"]))
    conditions = list(dict.fromkeys(long["condition"]))
    colors = dict(zip(conditions, sns.color_palette("colorblind", len(conditions)), strict=True))
    fig, axes = plt.subplots(1, len(columns), figsize=(3.2 * len(columns), 3.6), squeeze=False)
    for ax, column in zip(axes[0], columns, strict=True):
        sub = long[(long["column"] == column) & long["mean"].notna()]
        ax.bar(range(len(sub)), sub["mean"], yerr=sub["sd"].where(sub["n"] > 1), capsize=2,
               color=[colors[c] for c in sub["condition"]])
        ax.set_xticks(range(len(sub)), sub["condition"], rotation=30, ha="right", fontsize=8)
        ax.set_title(column, fontsize=9)
    fig.suptitle(title)
    fig.tight_layout()
    return fig
