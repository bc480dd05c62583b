"""Everything the viewer and figures show, read through the run view (adag.view) and turned into
JSON-able dicts."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pandas as pd

from adag.describe.records import input_records, output_records
from adag.errors import AdagError
from adag.report.config import DEFAULT_EDGE_SHARE, DEFAULT_SHARE, MAX_MULTIPLIER, TARGET_INPUTS
from adag.report.graph import (
    PromptGraph,
    collapse_clusters,
    correct_target,
    expected_answer,
    prompt_graph,
    pruning_order,
)
from adag.report.layout import CLUSTER_R_MAX, CLUSTER_R_MIN, Layout, cluster_layout, prompt_layout
from adag.report.palette import NEGATIVE, POSITIVE, cluster_color
from adag.report.study import study_payload
from adag.view import RunView

EXEMPLARS = 5
PUSHED = 8
CONTEXT = 6  # tokens of context kept on each side of an exemplar's highlighted tokens
HIGHLIGHT = 0.25  # a token is highlighted when its value is at least this share of the excerpt's largest,
HIGHLIGHTED = 4  # and among its this many largest
EDGE_COLUMNS = ["prompt", "source_kind", "source", "target_kind", "target", "weight", "attribution"]
KIND_CODES = {"embedding": "e", "neuron": "n", "supernode": "s", "logit": "l"}


def prompt_row(view: RunView, prompt: int) -> pd.Series:
    """One row of the prompts table."""
    prompts = view.prompts
    found = np.flatnonzero(prompts["prompt"].to_numpy() == prompt)
    if not len(found):
        ids = prompts["prompt"]
        raise AdagError(f"no prompt {prompt} in {view.path}; prompts are {ids.min()}..{ids.max()}")
    return prompts.iloc[found[0]]


def graph_of(view: RunView, prompt: int) -> PromptGraph:
    """One prompt's attribution graph (nodes with their clusters once the run is clustered)."""
    row = prompt_row(view, prompt)
    nodes = view.nodes_by_prompt[prompt]
    if "cluster" not in nodes:
        nodes = nodes.assign(cluster=-1)
    edges = view.edges_by_prompt.get(prompt, pd.DataFrame(columns=EDGE_COLUMNS))
    return prompt_graph(row, nodes, view.embeddings_by_prompt[prompt], edges, view.model["layers"], view.labels)


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


def _total_attribution(view: RunView) -> pd.Series:
    """Each prompt's summed |attribution| over its nodes."""
    nodes = view.node_keys
    totals = nodes.assign(strength=nodes["attribution"].abs()).groupby("prompt")["strength"].sum()
    return totals.reindex(view.prompts["prompt"], fill_value=0.0)


def chosen_prompts(view: RunView, count: int, ids: list[int] | None = None) -> list[int]:
    """The prompts whose graphs a report embeds: the given ids, or the `count` prompts with the largest
    total |attribution| over their nodes."""
    if ids is not None:
        known = set(view.prompts["prompt"].tolist())
        missing = sorted(set(ids) - known)
        if missing:
            raise AdagError(f"no prompt {missing[0]} in {view.path}; prompts are {min(known)}..{max(known)}")
        return sorted(set(ids))
    totals = _total_attribution(view)
    ranked = sorted(totals.items(), key=lambda item: (-item[1], item[0]))
    return sorted(int(p) for p, _ in ranked[:max(count, 0)])


def run_payload(view: RunView, graph_prompts: list[int]) -> dict:
    """The viewer's data: prompts, clusters with descriptions and exemplars, the dataset cluster graph
    and the attribution graphs of `graph_prompts` (others are left out, or served on demand)."""
    view.require("cluster")
    totals = _total_attribution(view)
    embedded = set(graph_prompts)
    prompts = [{"id": int(p.prompt), "text": p.text, "metric": float(p.metric), "tokens": [str(t) for t in p.tokens],
                "token_ids": [int(t) for t in p.token_ids], "target_ids": [int(t) for t in p.target_ids],
                "total_attribution": float(totals.get(p.prompt, 0.0)), "embedded": int(p.prompt) in embedded,
                "targets": _targets(p)} for _, p in view.prompts.iterrows()]
    return _clean({
        "run": {"model": view.model, "dataset": view.dataset, "prompts": len(prompts), "embedded": len(embedded)},
        "defaults": {"share": DEFAULT_SHARE, "edge_share": DEFAULT_EDGE_SHARE, "target_inputs": list(TARGET_INPUTS),
                     "max_multiplier": MAX_MULTIPLIER},
        "colors": {"positive": POSITIVE, "negative": NEGATIVE},
        "prompts": prompts,
        "clusters": _cluster_items(view),
        "cluster_graph": _cluster_graph(view),
        "study": study_payload(view),
    }) | {"graphs": {str(p): prompt_payload(view, p) for p in sorted(embedded)}}


def _targets(prompt: pd.Series) -> list[dict]:
    """The prompt's target tokens with their logits and probabilities; the expected answer's marked `correct`."""
    tokens = [str(t) for t in prompt["target_tokens"]]
    correct = correct_target(tokens, expected_answer(prompt))
    return [{"token": t, "logit": float(logit), "probability": float(prob), "correct": n == correct}
            for n, (t, logit, prob) in enumerate(zip(tokens, prompt["target_logits"], prompt["target_probs"]))]


def _cluster_items(view: RunView) -> list[dict]:
    descriptions = view.table("describe", "descriptions")
    described = descriptions.set_index("cluster") if descriptions is not None else None
    steering = view.table("steer", "summary")
    controls = view.table("steer", "controls")
    members_of = dict(tuple(view.half_neurons.groupby("cluster")))
    steering_of = dict(tuple(steering.groupby("cluster"))) if steering is not None else {}
    control_of: dict[int, list[dict]] = {}
    for record in controls.to_dict("records") if controls is not None else []:
        control_of.setdefault(int(record["cluster"]), []).append(record)
    outputs = output_records(view.nodes, view.prompts, view.node_cluster)
    inputs = None  # made only for clusters without the describe stage's excerpts
    items = []
    for row in view.clusters.itertuples():
        c = int(row.cluster)
        item = {"id": c, "size": int(row.size), "mean_layer": float(row.mean_layer), "color": cluster_color(c),
                "mean_attribution": float(row.mean_attribution), "label": view.labels[c]}
        if described is not None and c in described.index:
            d = described.loc[c]
            item.update({key: d[key] for key in ("status", "failure", "input_description", "input_score",
                                                 "negative_input_description", "negative_input_score",
                                                 "output_description", "output_score")})
            item.update(_described_extras(d))
        if "exemplars" not in item:
            if inputs is None:
                inputs = input_records(view.nodes, view.prompts, view.node_cluster,
                                       view.config("trace")["keep_first_position"])
            records = sorted(inputs.get(c, []), key=lambda r: -float(r.values.max(initial=0)))[:EXEMPLARS]
            item["exemplars"] = [compact_excerpt(r.prompt, "input+", r.tokens, r.values) for r in records]
        item["pushed"], item["suppressed"] = _pushed(outputs.get(c, []))
        members = members_of[c].sort_values("attribution", key=abs, ascending=False)
        item["members"] = members[["layer", "neuron", "polarity", "attribution"]].round(4).to_dict("records")
        if steering is not None:
            swept = steering_of.get(c, steering.iloc[:0])
            item["steering"] = swept[["multiplier", "p_top", "measure", "kl"]].to_dict("records")
        if c in control_of:
            item["controls"] = control_of[c]
        items.append(item)
    return items


def compact_excerpt(prompt: int, part: str, tokens: list[str], values, highlight: list[bool] | None = None) -> dict:
    """An excerpt cut to its highlighted tokens with CONTEXT tokens either side (the rest of a long
    chat prompt, such as its system prompt, is left out and marked `cut`)."""
    values = np.nan_to_num(np.asarray(values, float))
    if highlight is None:
        strength = np.abs(values)
        largest = np.argsort(-strength, kind="stable")[:HIGHLIGHTED]
        highlight = np.zeros(len(values), bool)
        highlight[largest] = strength[largest] >= HIGHLIGHT * max(float(strength.max(initial=0.0)), 1e-12)
        highlight = highlight.tolist()
    lit = np.flatnonzero(highlight)
    start, end = (max(0, lit[0] - CONTEXT), min(len(tokens), lit[-1] + CONTEXT + 1)) if len(lit) else (0, len(tokens))
    return {"prompt": int(prompt), "part": part, "tokens": [str(t) for t in tokens[start:end]],
            "values": [round(float(v), 4) for v in values[start:end]],
            "highlight": [bool(h) for h in highlight[start:end]], "cut": [start > 0, end < len(tokens)]}


def _described_extras(row: pd.Series) -> dict:
    """The describe stage's cross-prompt facts and the excerpts its explainer saw, where it wrote them."""
    extras: dict[str, Any] = {}
    facts = row.get("facts")
    if facts is not None and not (isinstance(facts, float) and np.isnan(facts)):
        extras["facts"] = [str(f) for f in facts]
    raw = row.get("exemplars")
    if isinstance(raw, str) and raw:
        try:
            shown = json.loads(raw)
        except ValueError:
            shown = []
        extras["exemplars"] = [compact_excerpt(e["prompt"], e.get("part", "input+"), e["tokens"], e["values"],
                                               e.get("highlight")) for e in shown
                               if isinstance(e, dict) and {"prompt", "tokens", "values"} <= e.keys()]
    return extras


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


def dataset_cluster_layout(view: RunView) -> Layout:
    """The dataset cluster graph's layout, in the order of `view.clusters`; each label begins with its id."""
    clusters = view.clusters["cluster"]
    mean = view.table("cluster", "mean_clusters").set_index("cluster")["attribution"].reindex(clusters, fill_value=0)
    return cluster_layout(view.clusters["mean_layer"].to_numpy(), mean.to_numpy(),
                          [f"{int(c)}: {view.labels[int(c)]}" for c in clusters])


def _cluster_graph(view: RunView) -> dict:
    """Clusters placed by mean layer, sized by mean attribution over prompts; edges are mean summed
    direct edge attributions between clusters."""
    layout = dataset_cluster_layout(view)
    mean = view.table("cluster", "mean_clusters").set_index("cluster")["attribution"]
    edges = view.table("cluster", "mean_cluster_edges")
    if edges is None:
        edges = pd.DataFrame({"source_cluster": [], "target_cluster": [], "attribution": []})
    return {"layout": layout.to_json(), "radius": [CLUSTER_R_MIN, CLUSTER_R_MAX],
            "clusters": view.clusters["cluster"].astype(int).tolist(),
            "attribution": [float(mean.get(c, 0.0)) for c in view.clusters["cluster"]],
            "edges": {"source": edges["source_cluster"].astype(int).tolist(),
                      "target": edges["target_cluster"].astype(int).tolist(),
                      "attribution": round_significant(edges["attribution"])}}


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


def prompt_payload(view: RunView, prompt: int) -> dict:
    """One prompt's attribution graph and its supernode graph (whose edges between clusters, with
    their attributions, are the prompt's cluster graph), each with its layout."""
    graph = graph_of(view, prompt)
    layout = prompt_layout(graph)
    supernodes = collapse_clusters(graph)
    return {"prompt": prompt, "tokens": graph.tokens, "neurons": graph_json(graph, layout, True),
            "supernodes": graph_json(supernodes, prompt_layout(supernodes, grid=layout.grid), True)}


def payload_json(payload: dict) -> str:
    """JSON safe to embed in a <script> element: '<', '>' and '&' are escaped."""
    return (json.dumps(payload, ensure_ascii=False, separators=(",", ":")).replace("<", "\\u003c")
            .replace(">", "\\u003e").replace("&", "\\u0026"))
