"""Correlating clusters' per-prompt attribution with an external per-prompt value: the correlate stage."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import pearsonr, spearmanr

from adag.errors import AdagError
from adag.stages import writing
from adag.steer.config import CorrelateConfig
from adag.store import RunDir

STAGE = "correlate"


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


def correlate_run(run_dir: str | Path | RunDir, config: CorrelateConfig) -> pd.DataFrame:
    """Correlate every cluster with the metadata field `config.field`; written to RUN/correlate/."""
    with writing(run_dir, STAGE, config) as (view, out):
        prompts = view.prompts
        values = prompts["metadata"].map(lambda m: json.loads(m).get(config.field))
        if values.isna().all():
            raise AdagError(f"no prompt has metadata field '{config.field}'; give --field one of the dataset's "
                            "metadata fields")
        numbers = pd.to_numeric(values, errors="coerce")
        if numbers.isna().any():
            raise AdagError(f"metadata field '{config.field}' is missing or not a number on some prompts")
        table = correlate(view.table("cluster", "prompt_clusters"),
                          pd.Series(numbers.to_numpy(), index=prompts["prompt"]))
        out.write_table("correlation", table.assign(field=config.field))
    return table


def correlate_summary(table: pd.DataFrame, run_dir: str) -> str:
    return table.round(4).to_string(index=False)
