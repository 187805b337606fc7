"""Figures of a training run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns


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
