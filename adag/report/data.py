"""Everything the viewer shows, gathered from a run directory into one JSON-able dict."""

from __future__ import annotations

import base64
import json
from typing import Any

import numpy as np

from adag.describe.records import load_cluster_records
from adag.view import RunView

EXEMPLARS = 5
PUSHED = 8
NEURON_EDGES = 400


def _clean(value: Any) -> Any:
    """JSON-safe: NaN and infinities become None, numpy scalars plain numbers."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def run_payload(view: RunView) -> dict:
    """The viewer's data: prompts, clusters with descriptions and exemplars, cluster graphs (dataset
    average and per prompt), and each prompt's neuron-level graph (strongest edges)."""
    view.require("cluster")
    prompts, half, clusters = view.prompts, view.half_neurons, view.clusters
    descriptions = view.table("describe", "descriptions")
    described = descriptions.set_index("cluster") if descriptions is not None else None
    steering = view.table("steer", "summary")
    controls = view.table("steer", "controls")
    members_of = dict(tuple(half.groupby("cluster")))
    steering_of = dict(tuple(steering.groupby("cluster"))) if steering is not None else {}
    control_of = {int(r["cluster"]): r for r in controls.to_dict("records")} if controls is not None else {}
    inputs, outputs = load_cluster_records(view)
    texts = view.prompt_text

    cluster_items = []
    for row in clusters.itertuples():
        c = int(row.cluster)
        item = {"id": c, "size": int(row.size), "mean_layer": float(row.mean_layer),
                "mean_attribution": float(row.mean_attribution), "label": f"cluster {c}"}
        if described is not None and c in described.index:
            d = described.loc[c]
            item.update({key: d[key] for key in ("status", "failure", "input_description", "input_score",
                                                 "negative_input_description", "negative_input_score",
                                                 "output_description", "output_score")})
            if d["label"]:
                item["label"] = d["label"]
        records = sorted(inputs.get(c, []), key=lambda r: -float(r.values.max(initial=0)))[:EXEMPLARS]
        item["exemplars"] = [{"prompt": r.prompt, "text": texts[r.prompt], "tokens": r.tokens,
                              "values": r.values.round(4).tolist()} for r in records]
        item["pushed"], item["suppressed"] = _pushed(outputs.get(c, []))
        members = members_of[c].sort_values("attribution", key=abs, ascending=False)
        item["members"] = members[["layer", "neuron", "polarity", "attribution"]].round(4).to_dict("records")
        if steering is not None:
            swept = steering_of.get(c, steering.iloc[:0])
            item["steering"] = swept[["multiplier", "p_top", "kl"]].to_dict("records")
            plot = view.path / "steer" / "plots" / f"cluster-{c:03d}.png"
            if plot.exists():
                item["steering_plot"] = "data:image/png;base64," + base64.b64encode(plot.read_bytes()).decode()
        if c in control_of:
            item["control"] = control_of[c]
        cluster_items.append(item)

    return _clean({
        "run": {"model": view.model, "dataset": view.dataset},
        "prompts": [{"id": int(p.prompt), "text": p.text, "tokens": list(p.tokens),
                     "targets": list(p.target_tokens), "metric": float(p.metric)} for p in prompts.itertuples()],
        "clusters": cluster_items,
        "graph": _graphs(view),
        "neurons": _neuron_graphs(view),
    })


def _pushed(records) -> tuple[list, list]:
    """Target tokens the cluster pushes up and down most, summed over prompts."""
    totals: dict[str, float] = {}
    for r in records:
        for token, value in zip(r.tokens, r.values):
            totals[token] = totals.get(token, 0.0) + float(value)
    ranked = sorted(totals.items(), key=lambda kv: kv[1])
    up = [{"token": t, "value": round(v, 4)} for t, v in reversed(ranked[-PUSHED:]) if v > 0]
    down = [{"token": t, "value": round(v, 4)} for t, v in ranked[:PUSHED] if v < 0]
    return up, down


def _graphs(view: RunView) -> dict:
    mean_edges = view.table("cluster", "mean_cluster_edges")
    prompt_edges = view.table("cluster", "cluster_edges")
    edges_by_prompt = dict(tuple(prompt_edges.groupby("prompt"))) if prompt_edges is not None else {}
    graph = {"mean": {"nodes": view.table("cluster", "mean_clusters").to_dict("records"),
                      "edges": mean_edges.to_dict("records") if mean_edges is not None else []},
             "prompts": {}}
    for prompt, group in view.table("cluster", "prompt_clusters").groupby("prompt"):
        edges = edges_by_prompt.get(prompt)
        graph["prompts"][str(int(prompt))] = {
            "nodes": group[["cluster", "attribution"]].to_dict("records"),
            "edges": edges[["source_cluster", "target_cluster", "attribution"]].to_dict("records")
            if edges is not None else []}
    return graph


def _neuron_graphs(view: RunView) -> dict:
    out = {}
    columns = ["node", "layer", "position", "neuron", "activation", "attribution", "cluster"]
    for prompt, nodes in view.nodes_by_prompt.items():
        if nodes.empty:
            continue
        entry = {"nodes": nodes[columns].round(4).to_dict("records"), "edges": []}
        edges = view.edges_by_prompt.get(prompt)
        if edges is not None:
            inner = (edges["source_kind"].astype(str) == "neuron") & (edges["target_kind"].astype(str) == "neuron")
            mine = edges[inner]
            mine = mine.reindex(mine["attribution"].abs().sort_values(ascending=False).index).head(NEURON_EDGES)
            entry["edges"] = mine[["source", "target", "attribution"]].round(5).to_dict("records")
        out[str(prompt)] = entry
    return out


def payload_json(payload: dict) -> str:
    """JSON safe to embed in a <script> element: '<', '>' and '&' are escaped."""
    return (json.dumps(payload, ensure_ascii=False).replace("<", "\\u003c").replace(">", "\\u003e")
            .replace("&", "\\u0026"))
