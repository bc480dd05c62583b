"""Correlating clusters' per-prompt attribution with an external per-prompt metric."""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.stats import pearsonr, spearmanr


def correlate(prompt_clusters: pd.DataFrame, metric: pd.Series) -> pd.DataFrame:
    """Pearson and Spearman correlation (with p-values) of each cluster's per-prompt attribution with
    `metric` (indexed by prompt). A cluster absent from a prompt has attribution 0 there."""
    wide = prompt_clusters.pivot_table(index="prompt", columns="cluster", values="attribution", aggfunc="sum")
    wide = wide.reindex(metric.index).fillna(0.0)
    rows = []
    for cluster in wide.columns:
        x, y = wide[cluster].to_numpy(), metric.to_numpy(dtype=float)
        if np.ptp(x) == 0 or np.ptp(y) == 0 or len(x) < 3:
            rows.append({"cluster": cluster, "pearson": np.nan, "pearson_p": np.nan, "spearman": np.nan,
                         "spearman_p": np.nan, "prompts": len(x)})
            continue
        pearson, spearman = pearsonr(x, y), spearmanr(x, y)
        rows.append({"cluster": cluster, "pearson": float(pearson.statistic), "pearson_p": float(pearson.pvalue),
                     "spearman": float(spearman.statistic), "spearman_p": float(spearman.pvalue),
                     "prompts": len(x)})
    return pd.DataFrame(rows).sort_values("pearson_p", na_position="last").reset_index(drop=True)
