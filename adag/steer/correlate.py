"""Correlating clusters' per-prompt attribution with an external per-prompt value: the correlate stage."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import false_discovery_control, pearsonr, spearmanr

from adag.errors import AdagError
from adag.pipeline import StageResult, Summary, writing
from adag.steer.config import CORRELATE_STAGE, CorrelateConfig
from adag.store import RunDir
from adag.view import RunView

STAGE = CORRELATE_STAGE.name
MEASURE = "measure"  # --field measure: the measure stage's values (CorrelateConfig.needs it)
MIN_PAIRS = 3  # a correlation over fewer pairs has no p-value


def correlate(prompt_clusters: pd.DataFrame, values: pd.Series, method: str = "pearson",
              alpha: float = 0.05) -> pd.DataFrame:
    """Pearson and Spearman correlation of each cluster's per-prompt attribution with `values`
    (indexed by prompt), their p-values and Benjamini-Hochberg adjusted p-values (`*_q`: the false
    discovery rate over the clusters tested). A cluster absent from a prompt has attribution 0 there.
    Sorted by the p-value of `method`; `significant` is its q below `alpha`."""
    values = values[np.isfinite(values.to_numpy(dtype=float))]  # prompts without a value take no part
    if len(values) < MIN_PAIRS:
        raise AdagError(f"correlate needs at least {MIN_PAIRS} prompts with a finite value, and {len(values)} "
                        f"have one; measure (or trace) more prompts")
    y = values.to_numpy(dtype=float)
    if np.ptp(y) == 0:
        raise AdagError(f"the value is the same on every prompt ({y[0]:g}), so nothing correlates with it; "
                        "give a field that varies")
    wide = prompt_clusters.pivot_table(index="prompt", columns="cluster", values="attribution", aggfunc="sum")
    wide = wide.reindex(values.index).fillna(0.0)
    rows = []
    for cluster in wide.columns:
        x = wide[cluster].to_numpy()
        row = {"cluster": cluster, "pearson": np.nan, "pearson_p": np.nan, "spearman": np.nan,
               "spearman_p": np.nan, "prompts": len(x)}
        if np.ptp(x) > 0 and np.ptp(y) > 0:
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
    values = [json.loads(m).get(field) for m in prompts["metadata"]]
    if all(value is None for value in values):
        raise AdagError(f"no prompt has metadata field '{field}'; give --field measure (after `adag measure`) "
                        "or one of the dataset's metadata fields")
    kinds = {bool if isinstance(v, bool) else float if isinstance(v, int | float) else type(v) for v in values}
    for prompt, value in zip(prompts["prompt"], values):
        if kinds != {bool} and not _finite_number(value):
            shown = "missing" if value is None else f"{json.dumps(value)[:40]}, not a finite number"
            text = " (a CSV column is read as numbers only when every filled cell is a number)" \
                if isinstance(value, str) else ""
            raise AdagError(f"metadata field '{field}' is {shown} on prompt {int(prompt)}; give every prompt a "
                            f"number{text} (or every prompt true/false)")
    return pd.Series([float(v) for v in values], index=prompts["prompt"].to_numpy())


def _finite_number(value: object) -> bool:
    """An int or float (not a bool, not text that looks like one) that a float holds, finitely."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    try:
        return bool(np.isfinite(float(value)))
    except OverflowError:  # an integer beyond a float's range, e.g. 10**400
        return False


def correlate_run(run_dir: str | Path | RunDir, config: CorrelateConfig) -> StageResult:
    """Correlate every cluster with `config.field`; written to RUN/correlate/correlation.parquet."""
    with writing(run_dir, CORRELATE_STAGE, config) as (view, out):
        values = prompt_values(view, config.field)
        table = correlate(view.table("cluster", "prompt_clusters"), values, config.method,
                          config.alpha).assign(field=config.field)
        out.write_table("correlation", table)
        out.facts.update(field=config.field, significant=int(table["significant"].sum()))
    return StageResult(view.run, table=table)


def correlate_summary(result: StageResult) -> Summary:
    table = result.table
    field = table["field"].iloc[0] if len(table) else "the field"
    head = (f"{int(table['significant'].sum())} of {len(table)} clusters correlate significantly with {field} "
            "(Benjamini-Hochberg adjusted p below alpha)")
    return Summary(head + "\n" + table.drop(columns="field").round(4).to_string(index=False))
