"""Everything the viewer and figures show, read from a run directory and turned into JSON-able dicts.

`read_tables` is the one place that reads the run; the rest works on the tables it returns.
"""

from __future__ import annotations

import base64
import colorsys
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from adag.cluster.run import node_clusters
from adag.describe.records import input_records, output_records
from adag.errors import AdagError
from adag.report.graph import (
    DEFAULT_MIN_WEIGHT,
    DEFAULT_SHARE,
    PromptGraph,
    collapse_clusters,
    prompt_graph,
    pruning_order,
)
from adag.report.layout import CLUSTER_R_MAX, CLUSTER_R_MIN, Layout, cluster_layout, prompt_layout
from adag.store import RunDir

EXEMPLARS = 5
PUSHED = 8
EDGE_COLUMNS = ["prompt", "source_kind", "source", "target_kind", "target", "weight", "attribution"]
KIND_CODES = {"embedding": "e", "neuron": "n", "supernode": "s", "logit": "l"}


@dataclass
class RunTables:
    """The tables the viewer, figures and export draw from, sorted by prompt, with each node's
    cluster (-1 for none) and each cluster's label. Cluster tables are None before `adag cluster`."""

    run: RunDir
    prompts: pd.DataFrame
    nodes: pd.DataFrame
    embeddings: pd.DataFrame
    edges: pd.DataFrame
    half_neurons: pd.DataFrame | None
    clusters: pd.DataFrame | None
    mean_clusters: pd.DataFrame | None
    mean_cluster_edges: pd.DataFrame | None
    descriptions: pd.DataFrame | None
    steering: pd.DataFrame | None
    controls: pd.DataFrame | None
    labels: dict[int, str]

    def of_prompt(self, table: pd.DataFrame, prompt: int) -> pd.DataFrame:
        """The rows of a table sorted by prompt that belong to one prompt."""
        column = table["prompt"].to_numpy()
        return table.iloc[np.searchsorted(column, prompt, "left"):np.searchsorted(column, prompt, "right")]

    def prompt_row(self, prompt: int) -> pd.Series:
        rows = self.of_prompt(self.prompts, prompt)
        if rows.empty:
            ids = self.prompts["prompt"]
            raise AdagError(f"no prompt {prompt} in {self.run.path}; prompts are {ids.min()}..{ids.max()}")
        return rows.iloc[0]

    def graph(self, prompt: int) -> PromptGraph:
        nodes = self.of_prompt(self.nodes, prompt)
        return prompt_graph(self.prompt_row(prompt), nodes, self.of_prompt(self.embeddings, prompt),
                            self.of_prompt(self.edges, prompt), self.run.manifest["model"]["layers"], self.labels)


def _optional(run: RunDir, stage: str, name: str) -> pd.DataFrame | None:
    exists = run.table_path(stage, name).exists() or (run.path / stage / name).is_dir()
    return run.read_table(stage, name) if run.stage_done(stage) and exists else None


def read_tables(run_dir: str | Path) -> RunTables:
    """Read a traced run and whatever later stages have written."""
    run = RunDir.open(run_dir)
    run.require_stage("trace", "adag trace")

    def by_prompt(table: pd.DataFrame) -> pd.DataFrame:
        if table["prompt"].is_monotonic_increasing:  # as the trace writes them
            return table
        return table.sort_values("prompt", kind="stable").reset_index(drop=True)

    prompts = by_prompt(run.read_table("trace", "prompts"))
    nodes = by_prompt(run.read_table("trace", "nodes"))
    edges = _optional(run, "trace", "edges")
    half = _optional(run, "cluster", "half_neurons")
    clusters = _optional(run, "cluster", "clusters")
    descriptions = _optional(run, "describe", "descriptions")
    nodes["cluster"] = node_clusters(nodes, half) if half is not None else -1
    labels = {int(c): f"cluster {int(c)}" for c in clusters["cluster"]} if clusters is not None else {}
    if descriptions is not None:
        labels.update({int(c): str(label) for c, label in zip(descriptions["cluster"], descriptions["label"])
                       if label})
    return RunTables(
        run=run, prompts=prompts, nodes=nodes, embeddings=by_prompt(run.read_table("trace", "embeddings")),
        edges=by_prompt(edges) if edges is not None else pd.DataFrame(columns=EDGE_COLUMNS),
        half_neurons=half, clusters=clusters, mean_clusters=_optional(run, "cluster", "mean_clusters"),
        mean_cluster_edges=_optional(run, "cluster", "mean_cluster_edges"), descriptions=descriptions,
        steering=_optional(run, "steer", "summary"), controls=_optional(run, "steer", "controls"), labels=labels)


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


def cluster_color(cluster: int) -> str:
    """A distinct colour per cluster: hues a golden angle apart."""
    red, green, blue = colorsys.hls_to_rgb((0.55 + cluster * 0.381966) % 1.0, 0.5, 0.65)
    return f"#{round(red * 255):02x}{round(green * 255):02x}{round(blue * 255):02x}"


def chosen_prompts(tables: RunTables, count: int, ids: list[int] | None = None) -> list[int]:
    """The prompts whose graphs a report embeds: the given ids, or the `count` prompts with the largest
    total |attribution| over their nodes."""
    if ids is not None:
        known = set(tables.prompts["prompt"].tolist())
        missing = sorted(set(ids) - known)
        if missing:
            raise AdagError(f"no prompt {missing[0]} in {tables.run.path}; prompts are "
                            f"{min(known)}..{max(known)}")
        return sorted(set(ids))
    totals = tables.nodes.assign(strength=tables.nodes["attribution"].abs()).groupby("prompt")["strength"].sum()
    totals = totals.reindex(tables.prompts["prompt"], fill_value=0.0)
    ranked = sorted(totals.items(), key=lambda item: (-item[1], item[0]))
    return sorted(int(p) for p, _ in ranked[:max(count, 0)])


def run_payload(tables: RunTables, graph_prompts: list[int]) -> dict:
    """The viewer's data: prompts, clusters with descriptions and exemplars, the dataset cluster graph
    and the attribution graphs of `graph_prompts` (others are left out, or served on demand)."""
    run = tables.run
    run.require_stage("cluster", "adag cluster")
    totals = tables.nodes.assign(strength=tables.nodes["attribution"].abs()).groupby("prompt")["strength"].sum()
    embedded = set(graph_prompts)
    prompts = [{"id": int(p.prompt), "text": p.text, "metric": float(p.metric),
                "total_attribution": float(totals.get(p.prompt, 0.0)), "embedded": int(p.prompt) in embedded,
                "targets": [{"token": t, "logit": float(logit), "probability": float(prob)}
                            for t, logit, prob in zip(p.target_tokens, p.target_logits, p.target_probs)]}
               for p in tables.prompts.itertuples()]
    return _clean({
        "run": {"model": run.manifest["model"], "dataset": run.manifest["dataset"],
                "prompts": len(prompts), "embedded": len(embedded)},
        "defaults": {"share": DEFAULT_SHARE, "min_weight": DEFAULT_MIN_WEIGHT},
        "prompts": prompts,
        "clusters": _cluster_items(tables),
        "cluster_graph": _cluster_graph(tables),
    }) | {"graphs": {str(p): prompt_payload(tables, p) for p in sorted(embedded)}}


def _cluster_items(tables: RunTables) -> list[dict]:
    run, prompts, nodes = tables.run, tables.prompts, tables.nodes
    node_cluster = nodes["cluster"].to_numpy()
    inputs = input_records(nodes, prompts, node_cluster, run.stage_config("trace")["keep_first_position"])
    outputs = output_records(nodes, prompts, node_cluster)
    texts = dict(zip(prompts["prompt"], prompts["text"]))
    described = tables.descriptions.set_index("cluster") if tables.descriptions is not None else None
    items = []
    for row in tables.clusters.itertuples():
        c = int(row.cluster)
        item = {"id": c, "size": int(row.size), "mean_layer": float(row.mean_layer), "color": cluster_color(c),
                "mean_attribution": float(row.mean_attribution), "label": tables.labels[c]}
        if described is not None and c in described.index:
            d = described.loc[c]
            item.update({key: d[key] for key in ("status", "failure", "input_description", "input_score",
                                                 "negative_input_description", "negative_input_score",
                                                 "output_description", "output_score")})
        records = sorted(inputs.get(c, []), key=lambda r: -float(r.values.max(initial=0)))[:EXEMPLARS]
        item["exemplars"] = [{"prompt": r.prompt, "text": texts[r.prompt], "tokens": r.tokens,
                              "values": r.values.round(4).tolist()} for r in records]
        item["pushed"], item["suppressed"] = _pushed(outputs.get(c, []))
        members = tables.half_neurons[tables.half_neurons["cluster"] == c].sort_values(
            "attribution", key=abs, ascending=False)
        item["members"] = members[["layer", "neuron", "polarity", "attribution"]].round(4).to_dict("records")
        if tables.steering is not None:
            mine = tables.steering[tables.steering["cluster"] == c]
            item["steering"] = mine[["multiplier", "p_top", "kl"]].to_dict("records")
            plot = run.path / "steer" / "plots" / f"cluster-{c:03d}.png"
            if plot.exists():
                item["steering_plot"] = "data:image/png;base64," + base64.b64encode(plot.read_bytes()).decode()
        if tables.controls is not None and c in set(tables.controls["cluster"]):
            item["control"] = tables.controls[tables.controls["cluster"] == c].iloc[0].to_dict()
        items.append(item)
    return items


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


def dataset_cluster_layout(tables: RunTables) -> Layout:
    """The dataset cluster graph's layout, in the order of `tables.clusters`."""
    mean = tables.mean_clusters.set_index("cluster")["attribution"].reindex(tables.clusters["cluster"], fill_value=0)
    return cluster_layout(tables.clusters["mean_layer"].to_numpy(), mean.to_numpy(),
                          [tables.labels[int(c)] for c in tables.clusters["cluster"]])


def _cluster_graph(tables: RunTables) -> dict:
    """Clusters placed by mean layer, sized by mean attribution over prompts; edges are mean summed
    direct edge attributions between clusters."""
    layout = dataset_cluster_layout(tables)
    mean = tables.mean_clusters.set_index("cluster")["attribution"]
    edges = tables.mean_cluster_edges
    return {"layout": layout.to_json(), "radius": [CLUSTER_R_MIN, CLUSTER_R_MAX],
            "clusters": tables.clusters["cluster"].astype(int).tolist(),
            "attribution": [float(mean.get(c, 0.0)) for c in tables.clusters["cluster"]],
            "edges": {"source": [] if edges is None else edges["source_cluster"].astype(int).tolist(),
                      "target": [] if edges is None else edges["target_cluster"].astype(int).tolist(),
                      "attribution": [] if edges is None else round_significant(edges["attribution"])}}


def round_significant(values, digits: int = 4) -> list:
    """Floats to `digits` significant digits each (short in JSON); NaN becomes None. Each value is
    an integer times a power of ten, divided or multiplied exactly once, so it prints short."""
    array = np.asarray(values, dtype=float)
    finite = np.isfinite(array)
    nonzero = finite & (array != 0)
    decimals = np.zeros(len(array))
    decimals[nonzero] = digits - 1 - np.floor(np.log10(np.abs(array[nonzero])))
    up, down = 10.0 ** np.maximum(decimals, 0), 10.0 ** np.maximum(-decimals, 0)
    rounded = (np.round(np.where(finite, array, 0.0) * up / down) * down / up).tolist()
    return rounded if finite.all() else [v if ok else None for v, ok in zip(rounded, finite)]


def graph_json(graph: PromptGraph, layout: Layout, edge_attribution: bool) -> dict:
    """A graph with its layout as columns (compact JSON): nodes, edges, labels, axis. Edge
    attributions are left out unless asked for (the viewer draws edges by weight)."""
    nodes = graph.nodes
    edges = {"source": graph.edges["source"].astype(int).tolist(), "target": graph.edges["target"].astype(int).tolist(),
             "weight": round_significant(graph.edges["weight"], 3)}
    if edge_attribution:
        edges["attribution"] = round_significant(graph.edges["attribution"], 4)
    return {
        "kind": [KIND_CODES[k] for k in nodes["kind"]],
        "layer": round_significant(nodes["layer"], 4), "position": nodes["position"].astype(int).tolist(),
        "neuron": nodes["neuron"].astype(int).tolist(), "activation": round_significant(nodes["activation"], 4),
        "attribution": round_significant(nodes["attribution"], 4), "cluster": nodes["cluster"].astype(int).tolist(),
        "members": nodes["members"].astype(int).tolist(), "prune": round_significant(pruning_order(graph), 4),
        "edges": edges, "layout": layout.to_json(),
    }


def prompt_payload(tables: RunTables, prompt: int) -> dict:
    """One prompt's attribution graph and its supernode graph (whose edges between clusters, with
    their attributions, are the prompt's cluster graph), each with its layout."""
    graph = tables.graph(prompt)
    layout = prompt_layout(graph)
    supernodes = collapse_clusters(graph)
    return {"prompt": prompt, "tokens": graph.tokens, "neurons": graph_json(graph, layout, False),
            "supernodes": graph_json(supernodes, prompt_layout(supernodes, grid=layout.grid), True)}


def payload_json(payload: dict) -> str:
    """JSON safe to embed in a <script> element: '<', '>' and '&' are escaped."""
    return (json.dumps(payload, ensure_ascii=False, separators=(",", ":")).replace("<", "\\u003c")
            .replace(">", "\\u003e").replace("&", "\\u0026"))
