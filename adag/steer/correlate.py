"""Correlating clusters' per-prompt attribution with an external per-prompt value: the correlate stage."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import false_discovery_control, pearsonr, spearmanr

from adag.errors import AdagError
from adag.pipeline import writing
from adag.steer.config import CORRELATE_STAGE, CorrelateConfig
from adag.store import RunDir
from adag.view import RunView

STAGE = CORRELATE_STAGE.name
MEASURE = "measure"  # --field measure: the measure stage's values (CorrelateConfig.needs it)


def correlate(prompt_clusters: pd.DataFrame, metric: pd.Series, method: str = "pearson",
              alpha: float = 0.05) -> pd.DataFrame:
    """Pearson and Spearman correlation of each cluster's per-prompt attribution with `metric`
    (indexed by prompt), their p-values and Benjamini-Hochberg adjusted p-values (`*_q`: the false
    discovery rate over the clusters tested). A cluster absent from a prompt has attribution 0 there.
    Sorted by the p-value of `method`; `significant` is its q below `alpha`."""
    wide = prompt_clusters.pivot_table(index="prompt", columns="cluster", values="attribution", aggfunc="sum")
    wide = wide.reindex(metric.index).fillna(0.0)
    y = metric.to_numpy(dtype=float)
    rows = []
    for cluster in wide.columns:
        x = wide[cluster].to_numpy()
        row = {"cluster": cluster, "pearson": np.nan, "pearson_p": np.nan, "spearman": np.nan,
               "spearman_p": np.nan, "prompts": len(x)}
        if np.ptp(x) > 0 and np.ptp(y) > 0 and len(x) >= 3:
            pearson, spearman = pearsonr(x, y), spearmanr(x, y)
            row.update(pearson=float(pearson.statistic), pearson_p=float(pearson.pvalue),
                       spearman=float(spearman.statistic), spearman_p=float(spearman.pvalue))
        rows.append(row)
    table = pd.DataFrame(rows)
    for name in ("pearson", "spearman"):
        table[f"{name}_q"] = adjusted(table[f"{name}_p"].to_numpy())
    table["significant"] = table[f"{method}_q"] < alpha
    columns = ["cluster", "pearson", "pearson_p", "pearson_q", "spearman", "spearman_p", "spearman_q",
               "significant", "prompts"]
    return table[columns].sort_values(f"{method}_p", na_position="last", kind="stable").reset_index(drop=True)


def adjusted(p_values: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values over the tests that have one (NaN stays NaN)."""
    out = np.full(len(p_values), np.nan)
    tested = ~np.isnan(p_values)
    if tested.any():
        out[tested] = false_discovery_control(p_values[tested], method="bh")
    return out


def prompt_values(view: RunView, field: str) -> pd.Series:
    """The per-prompt value `field` names, indexed by prompt: the measure stage's values for
    'measure', else a numeric metadata field."""
    prompts = view.prompts
    if field == MEASURE:
        values = view.table(MEASURE, "values").set_index("prompt")["value"]
        return values.reindex(prompts["prompt"].to_numpy())
    values = prompts["metadata"].map(lambda m: json.loads(m).get(field))
    if values.isna().all():
        raise AdagError(f"no prompt has metadata field '{field}'; give --field measure (after `adag measure`) "
                        "or one of the dataset's metadata fields")
    numbers = pd.to_numeric(values, errors="coerce")
    if numbers.isna().any():
        raise AdagError(f"metadata field '{field}' is missing or not a number on some prompts")
    return pd.Series(numbers.to_numpy(), index=prompts["prompt"].to_numpy())


def correlate_run(run_dir: str | Path | RunDir, config: CorrelateConfig) -> pd.DataFrame:
    """Correlate every cluster with `config.field`; written to RUN/correlate/correlation.parquet."""
    with writing(run_dir, CORRELATE_STAGE, config) as (view, out):
        values = prompt_values(view, config.field)
        table = correlate(view.table("cluster", "prompt_clusters"), values, config.method,
                          config.alpha).assign(field=config.field)
        out.write_table("correlation", table)
        out.facts.update(field=config.field, significant=int(table["significant"].sum()))
    return table


def correlate_summary(table: pd.DataFrame, run_dir: str) -> str:
    field = table["field"].iloc[0] if len(table) else "the field"
    head = (f"{int(table['significant'].sum())} of {len(table)} clusters correlate significantly with {field} "
            "(Benjamini-Hochberg adjusted p below alpha)")
    return head + "\n" + table.drop(columns="field").round(4).to_string(index=False)
