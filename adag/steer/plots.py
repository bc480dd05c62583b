"""PNG plots of steering sweeps, drawn on local Figure objects (no pyplot state, no backend change)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure


def plot_sweep(summary: pd.DataFrame, folder: Path) -> list[Path]:
    """One plot per cluster and an overview: mean probability of the original top answer against the
    multiplier."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    overview = Figure(figsize=(7, 4.5))
    axes = overview.subplots()
    for cluster, group in summary.groupby("cluster"):
        group = group.sort_values("multiplier")
        figure = Figure(figsize=(4, 3))
        ax = figure.subplots()
        ax.plot(group["multiplier"], group["p_top"], marker="o")
        ax.set(xlabel="multiplier", ylabel="P(original top answer)", title=f"cluster {cluster}", ylim=(0, 1))
        figure.tight_layout()
        path = folder / f"cluster-{int(cluster):03d}.png"
        figure.savefig(path, dpi=100)
        paths.append(path)
        axes.plot(group["multiplier"], group["p_top"], marker="o", label=f"cluster {cluster}")
    axes.set(xlabel="multiplier", ylabel="P(original top answer)", title="steering sweep", ylim=(0, 1))
    axes.legend(fontsize=7, ncol=2)
    overview.tight_layout()
    overview.savefig(folder / "overview.png", dpi=100)
    return [*paths, folder / "overview.png"]
