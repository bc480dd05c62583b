"""Export one prompt's graph to the Neuronpedia / circuit-tracer graph JSON format."""

from __future__ import annotations

import json
import time
from importlib import resources
from pathlib import Path

from adag import __version__
from adag.cluster.run import node_clusters
from adag.errors import AdagError
from adag.store import RunDir, atomic_write_bytes


def neuronpedia_graph(run_dir: str, prompt: int) -> dict:
    """Nodes are MLP neurons ("layer_neuron_position"), embeddings ("E_token_position") and logits;
    links carry attributions; cluster labels become node `clerp`s and `qParams.supernodes`."""
    run = RunDir.open(run_dir)
    run.require_stage("trace", "adag trace")
    prompts = run.read_table("trace", "prompts").set_index("prompt")
    if prompt not in prompts.index:
        raise AdagError(f"no prompt {prompt} in {run_dir}; prompts are {prompts.index.min()}..{prompts.index.max()}")
    info = prompts.loc[prompt]
    nodes = run.read_table("trace", "nodes")
    nodes = nodes[nodes["prompt"] == prompt]
    labels = _cluster_labels(run, nodes)
    n_layers = run.manifest["model"]["layers"]
    token_ids, tokens = list(info["token_ids"]), list(info["tokens"])
    last = len(tokens) - 1

    def neuron_id(row) -> str:
        return f"{int(row.layer)}_{int(row.neuron)}_{int(row.position)}"

    graph_nodes, node_ids = [], {}
    for row in nodes.itertuples():
        node_ids[int(row.node)] = neuron_id(row)
        graph_nodes.append({"node_id": neuron_id(row), "feature": int(row.neuron), "layer": str(int(row.layer)),
                            "ctx_idx": int(row.position), "feature_type": "mlp neuron",
                            "jsNodeId": neuron_id(row), "clerp": labels.get(int(row.node), ""),
                            "influence": float(abs(row.attribution)), "activation": float(row.activation)})
    for position, (token_id, token) in enumerate(zip(token_ids, tokens)):
        node = f"E_{int(token_id)}_{position}"
        graph_nodes.append({"node_id": node, "feature": None, "layer": "E", "ctx_idx": position,
                            "feature_type": "embedding", "jsNodeId": node, "clerp": token})
    logit_ids = []
    for target_id, token, logit in zip(info["target_ids"], info["target_tokens"], info["target_logits"]):
        node = f"{n_layers + 1}_{int(target_id)}_{last}"
        logit_ids.append(node)
        graph_nodes.append({"node_id": node, "feature": int(target_id), "layer": str(n_layers + 1),
                            "ctx_idx": last, "feature_type": "logit", "jsNodeId": node,
                            "clerp": f"output {token!r} (logit {logit:.2f})"})

    links = []
    if run.table_path("trace", "edges").exists() or (run.path / "trace" / "edges").is_dir():
        edges = run.read_table("trace", "edges")
        for edge in edges[edges["prompt"] == prompt].itertuples():
            source = (f"E_{int(token_ids[edge.source])}_{int(edge.source)}" if edge.source_kind == "embedding"
                      else node_ids[int(edge.source)])
            target = logit_ids[int(edge.target)] if edge.target_kind == "logit" else node_ids[int(edge.target)]
            links.append({"source": source, "target": target, "weight": float(edge.attribution)})

    supernodes = {}
    for node, label in labels.items():
        supernodes.setdefault(label, []).append(node_ids[node])
    return {
        "metadata": {"slug": f"adag-{Path(run_dir).name}-prompt{prompt}", "scan": run.manifest["model"]["spec"],
                     "prompt_tokens": tokens, "prompt": "".join(tokens),
                     "node_threshold": run.stage_config("trace").get("threshold", 0.0),
                     "info": {"description": info["text"], "creator_name": "adag",
                              "generator": {"name": "adag", "version": __version__},
                              "create_time_ms": int(time.time() * 1000)}},
        "qParams": {"pinnedIds": [], "supernodes": [[label, *ids] for label, ids in supernodes.items()],
                    "linkType": "both"},
        "nodes": graph_nodes,
        "links": links,
    }


def _cluster_labels(run: RunDir, nodes) -> dict[int, str]:
    if not run.stage_done("cluster"):
        return {}
    cluster_of = node_clusters(nodes, run.read_table("cluster", "half_neurons"))
    names = {}
    if run.stage_done("describe"):
        described = run.read_table("describe", "descriptions")
        names = {int(c): label for c, label in zip(described["cluster"], described["label"]) if label}
    return {int(node): names.get(int(c), f"cluster {int(c)}") for node, c in zip(nodes["node"], cluster_of) if c >= 0}


def graph_schema() -> dict:
    """The Neuronpedia graph schema (a copy of shared/schemas/neuronpedia-graph.schema.json)."""
    return json.loads(resources.files("adag.report").joinpath("neuronpedia-graph.schema.json").read_text())


def write_neuronpedia(run_dir: str, prompt: int, out: str) -> Path:
    """Write one prompt's graph, checked against the schema first."""
    import jsonschema

    graph = neuronpedia_graph(run_dir, prompt)
    jsonschema.validate(graph, graph_schema())
    path = Path(out)
    atomic_write_bytes(path, json.dumps(graph, indent=1).encode())
    return path
