"""Everything the viewer shows, gathered from a run directory into one JSON-able dict."""

from __future__ import annotations

import base64
import json
from typing import Any

import numpy as np
import pandas as pd

from adag.cluster.run import node_clusters
from adag.describe.records import input_records, output_records
from adag.store import RunDir

EXEMPLARS = 5
PUSHED = 8
NEURON_EDGES = 400


def _table(run: RunDir, stage: str, name: str) -> pd.DataFrame | None:
    path, parts = run.table_path(stage, name), run.path / stage / name
    return run.read_table(stage, name) if path.exists() or parts.is_dir() else None


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


def run_payload(run: RunDir) -> dict:
    """The viewer's data: prompts, clusters with descriptions and exemplars, cluster graphs (dataset
    average and per prompt), and each prompt's neuron-level graph (strongest edges)."""
    run.require_stage("cluster", "adag cluster")
    prompts = run.read_table("trace", "prompts")
    nodes = run.read_table("trace", "nodes")
    half = run.read_table("cluster", "half_neurons")
    clusters = run.read_table("cluster", "clusters")
    node_cluster = node_clusters(nodes, half)
    descriptions = _table(run, "describe", "descriptions")
    described = descriptions.set_index("cluster") if descriptions is not None else None
    steering = _table(run, "steer", "summary")
    controls = _table(run, "steer", "controls")
    inputs = input_records(nodes, prompts, node_cluster, run.stage_config("trace")["keep_first_position"])
    outputs = output_records(nodes, prompts, node_cluster)
    texts = dict(zip(prompts["prompt"], prompts["text"]))

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
        members = half[half["cluster"] == c].sort_values("attribution", key=abs, ascending=False)
        item["members"] = members[["layer", "neuron", "polarity", "attribution"]].round(4).to_dict("records")
        if steering is not None:
            item["steering"] = steering[steering["cluster"] == c][["multiplier", "p_top", "kl"]].to_dict("records")
            plot = run.path / "steer" / "plots" / f"cluster-{c:03d}.png"
            if plot.exists():
                item["steering_plot"] = "data:image/png;base64," + base64.b64encode(plot.read_bytes()).decode()
        if controls is not None and c in set(controls["cluster"]):
            item["control"] = controls[controls["cluster"] == c].iloc[0].to_dict()
        cluster_items.append(item)

    return _clean({
        "run": {"model": run.manifest["model"], "dataset": run.manifest["dataset"]},
        "prompts": [{"id": int(p.prompt), "text": p.text, "tokens": list(p.tokens),
                     "targets": list(p.target_tokens), "metric": float(p.metric)} for p in prompts.itertuples()],
        "clusters": cluster_items,
        "graph": _graphs(run),
        "neurons": _neuron_graphs(run, nodes, node_cluster),
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


def _graphs(run: RunDir) -> dict:
    mean_nodes = run.read_table("cluster", "mean_clusters")
    mean_edges = _table(run, "cluster", "mean_cluster_edges")
    prompt_nodes = run.read_table("cluster", "prompt_clusters")
    prompt_edges = _table(run, "cluster", "cluster_edges")
    graph = {"mean": {"nodes": mean_nodes.to_dict("records"),
                      "edges": mean_edges.to_dict("records") if mean_edges is not None else []},
             "prompts": {}}
    for prompt, group in prompt_nodes.groupby("prompt"):
        edges = prompt_edges[prompt_edges["prompt"] == prompt] if prompt_edges is not None else None
        graph["prompts"][str(int(prompt))] = {
            "nodes": group[["cluster", "attribution"]].to_dict("records"),
            "edges": edges[["source_cluster", "target_cluster", "attribution"]].to_dict("records")
            if edges is not None else []}
    return graph


def _neuron_graphs(run: RunDir, nodes: pd.DataFrame, node_cluster: np.ndarray) -> dict:
    edges = _table(run, "trace", "edges")
    frame = nodes[["prompt", "node", "layer", "position", "neuron", "activation", "attribution"]].assign(
        cluster=node_cluster)
    out = {}
    for prompt, group in frame.groupby("prompt"):
        entry = {"nodes": group.drop(columns="prompt").round(4).to_dict("records"), "edges": []}
        if edges is not None:
            mine = edges[(edges["prompt"] == prompt) & (edges["source_kind"].astype(str) == "neuron")
                         & (edges["target_kind"].astype(str) == "neuron")]
            mine = mine.reindex(mine["attribution"].abs().sort_values(ascending=False).index).head(NEURON_EDGES)
            entry["edges"] = mine[["source", "target", "attribution"]].round(5).to_dict("records")
        out[str(int(prompt))] = entry
    return out


def payload_json(payload: dict) -> str:
    """JSON safe to embed in a <script> element: '<', '>' and '&' are escaped."""
    return (json.dumps(payload, ensure_ascii=False).replace("<", "\\u003c").replace(">", "\\u003e")
            .replace("&", "\\u0026"))
