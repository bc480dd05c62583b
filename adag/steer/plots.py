"""PNG plots of steering sweeps, drawn on local Figure objects (no pyplot state, no backend change)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

MEASURE_LABELS = {"p_top": "P(original top answer)", "p_correct": "P(correct answer)",
                  "logit_diff": "logit(correct) - logit(misleading)", "judge": "judge's yes-rate"}
PROBABILITIES = {"p_top", "p_correct", "judge"}
CONTROL_COLOURS = {"traced": "tab:orange", "layer": "tab:gray"}


def plot_sweep(summary: pd.DataFrame, measure: str, folder: Path, draws: pd.DataFrame | None = None,
               baseline: float | None = None) -> list[Path]:
    """One plot per cluster and an overview: the mean measure against the multiplier. With control
    `draws` (changes from the unsteered `baseline`), each cluster's plot also shows its controls of
    each kind: their mean and the range of their middle 90%."""
    folder.mkdir(parents=True, exist_ok=True)
    label = MEASURE_LABELS[measure]
    limits = {"ylim": (0, 1)} if measure in PROBABILITIES else {}
    paths = []
    overview = Figure(figsize=(7, 4.5))
    axes = overview.subplots()
    for cluster, group in summary.groupby("cluster"):
        group = group.sort_values("multiplier")
        figure = Figure(figsize=(4.5, 3.2))
        ax = figure.subplots()
        ax.plot(group["multiplier"], group["measure"], marker="o", color="tab:blue", label=f"cluster {cluster}")
        if draws is not None and not draws.empty:
            _controls(ax, draws[draws["cluster"] == cluster], baseline)
        ax.set(xlabel="multiplier", ylabel=label, title=f"cluster {cluster}", **limits)
        ax.legend(fontsize=7)
        figure.tight_layout()
        path = folder / f"cluster-{int(cluster):03d}.png"
        figure.savefig(path, dpi=100)
        paths.append(path)
        axes.plot(group["multiplier"], group["measure"], marker="o", label=f"cluster {cluster}")
    axes.set(xlabel="multiplier", ylabel=label, title="steering sweep", **limits)
    axes.legend(fontsize=7, ncol=2)
    overview.tight_layout()
    overview.savefig(folder / "overview.png", dpi=100)
    return [*paths, folder / "overview.png"]


def _controls(ax, draws: pd.DataFrame, baseline: float) -> None:
    """Control sets of each kind: mean and 5-95% band of the measure (multiplier 1 is the baseline)."""
    for kind, group in draws.groupby("kind"):
        stats = group.groupby("multiplier")["change"].describe(percentiles=[0.05, 0.95])
        stats.loc[1.0] = 0.0
        stats = stats.sort_index()
        x = stats.index.to_numpy()
        colour = CONTROL_COLOURS.get(kind, "tab:green")
        ax.plot(x, baseline + stats["mean"], linestyle="--", marker=".", color=colour, label=f"{kind} controls")
        ax.fill_between(x, baseline + stats["5%"], baseline + stats["95%"], color=colour, alpha=0.2)
