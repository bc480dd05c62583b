"""The study section of the report: each prompt's measure (and its mean over each value of the rows'
parts), every cluster's correlation with the measure (corrected p-values), the descriptions of the
most correlated clusters, and each steered cluster's measure against its random controls of each kind."""

from __future__ import annotations

import base64
import json

import pandas as pd

from adag.steer.config import MeasureConfig
from adag.steer.plots import MEASURE_LABELS
from adag.view import RunView

TOP_DESCRIBED = 5  # clusters whose descriptions the section shows, besides the steered ones
MAX_PART_VALUES = 8  # a metadata field with more distinct values is not a part with variants (e.g. the country)


def study_payload(view: RunView) -> dict | None:
    """The section's data, or None for a run without a correlate stage."""
    correlation = view.table("correlate", "correlation")
    if correlation is None:
        return None
    config = view.config("correlate")
    method = config["method"]
    labels = view.labels
    rows = []
    for row in correlation.itertuples():
        rows.append({"cluster": int(row.cluster), "label": labels.get(int(row.cluster), f"cluster {row.cluster}"),
                     "r": getattr(row, method), "p": getattr(row, f"{method}_p"), "q": getattr(row, f"{method}_q"),
                     "significant": bool(row.significant)})
    steered = _steered(view)
    described = _descriptions(view, [r["cluster"] for r in rows[:TOP_DESCRIBED]] + [s["cluster"] for s in steered])
    measure = MeasureConfig(**view.config("measure")).measure if view.has("measure") else None
    values = view.table("measure", "values") if measure else None
    return {
        "field": config["field"], "method": method, "alpha": config["alpha"], "correction": "Benjamini-Hochberg",
        "measure": measure,
        "measure_label": MEASURE_LABELS[measure] if measure and config["field"] == "measure"
        else config["field"],
        "mean_measure": float(values["value"].mean()) if measure else None,
        "values": values[["prompt", "value"]].to_dict("records") if measure else [],
        "parts": _parts(view, values) if measure else [],
        "significant": sum(r["significant"] for r in rows), "correlations": rows,
        "descriptions": described, "steered": steered,
    }


def _parts(view: RunView, values: pd.DataFrame) -> list[dict]:
    """The mean measure over the prompts sharing each value of each part of the rows (a metadata field
    with 2 to MAX_PART_VALUES distinct text values, e.g. the framing of a misleading claim): how the
    behaviour depends on each part, as in the paper's substituted prompt parts."""
    metadata = pd.DataFrame([json.loads(text) for text in view.prompts["metadata"]], index=view.prompts["prompt"])
    measured = values.set_index("prompt")["value"]
    out = []
    for field in metadata.columns:
        column = metadata[field]
        if not column.map(lambda v: isinstance(v, str)).all() or not 2 <= column.nunique() <= MAX_PART_VALUES:
            continue
        grouped = measured.groupby(column.reindex(measured.index)).agg(["mean", "count"])
        out.append({"part": field, "values": [{"value": str(value), "mean": float(row["mean"]),
                                               "count": int(row["count"])}
                                              for value, row in grouped.sort_values("mean").iterrows()]})
    return out


def _steered(view: RunView) -> list[dict]:
    """Per steered cluster: the mean measure at each multiplier, and per control kind and steered
    multiplier the cluster's change, the controls' mean and 5-95% range, and the percentile."""
    summary = view.table("steer", "summary")
    if summary is None:
        return []
    controls = view.table("steer", "controls")
    draws = view.table("steer", "control_draws")
    out = []
    for cluster, sweep in summary.groupby("cluster", sort=False):
        item = {"cluster": int(cluster), "label": view.labels.get(int(cluster), f"cluster {cluster}"),
                "sweep": sweep.sort_values("multiplier")[["multiplier", "measure"]].to_dict("records"),
                "controls": []}
        if controls is not None:
            mine = controls[controls["cluster"] == cluster]
            for row in mine.to_dict("records"):
                spread = draws[(draws["cluster"] == cluster) & (draws["kind"] == row["kind"])
                               & (draws["multiplier"] == row["multiplier"])]["change"]
                kept = ("kind", "multiplier", "baseline", "change", "control_mean", "percentile", "controls",
                        "unmatched")
                item["controls"].append({**{key: row[key] for key in kept}, "control_low": _quantile(spread, 0.05),
                                         "control_high": _quantile(spread, 0.95)})
        plot = view.file("steer", f"plots/cluster-{int(cluster):03d}.png")
        if plot is not None:
            item["plot"] = "data:image/png;base64," + base64.b64encode(plot).decode()
        out.append(item)
    return out


def _quantile(values: pd.Series, q: float) -> float | None:
    return float(values.quantile(q)) if len(values) else None


def _descriptions(view: RunView, clusters: list[int]) -> list[dict]:
    table = view.table("describe", "descriptions")
    if table is None:
        return []
    described = table.set_index("cluster")
    out = []
    for cluster in dict.fromkeys(clusters):
        if cluster in described.index:
            row = described.loc[cluster]
            out.append({"cluster": cluster, "label": row["label"], "input_description": row["input_description"],
                        "input_score": row["input_score"], "output_description": row["output_description"],
                        "output_score": row["output_score"]})
    return out
