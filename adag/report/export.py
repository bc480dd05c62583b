"""Export one prompt's graph to the Neuronpedia / circuit-tracer graph JSON format."""

from __future__ import annotations

import json
import time
from importlib import resources
from pathlib import Path

from adag import __version__
from adag.errors import AdagError
from adag.report.config import ReportConfig
from adag.store import atomic_write_bytes
from adag.view import RunView


def neuronpedia_graph(run_dir: str | Path, prompt: int) -> dict:
    """Nodes are MLP neurons ("layer_neuron_position"), embeddings ("E_token_position") and logits;
    links carry attributions; cluster labels become node `clerp`s and `qParams.supernodes`."""
    view = RunView.open(run_dir)
    prompts = view.prompts.set_index("prompt")
    if prompt not in prompts.index:
        raise AdagError(f"no prompt {prompt} in {run_dir}; prompts are {prompts.index.min()}..{prompts.index.max()}")
    info = prompts.loc[prompt]
    nodes = view.nodes_by_prompt[prompt]
    labels = ({int(node): view.labels[int(c)] for node, c in zip(nodes["node"], nodes["cluster"]) if c >= 0}
              if "cluster" in nodes else {})
    n_layers = view.model["layers"]
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
    edges = view.edges_by_prompt.get(prompt)
    for edge in (edges.itertuples() if edges is not None else ()):
        source = (f"E_{int(token_ids[edge.source])}_{int(edge.source)}" if edge.source_kind == "embedding"
                  else node_ids[int(edge.source)])
        target = logit_ids[int(edge.target)] if edge.target_kind == "logit" else node_ids[int(edge.target)]
        links.append({"source": source, "target": target, "weight": float(edge.attribution)})

    supernodes = {}
    for node, label in labels.items():
        supernodes.setdefault(label, []).append(node_ids[node])
    return {
        "metadata": {"slug": f"adag-{Path(run_dir).name}-prompt{prompt}", "scan": view.model["spec"],
                     "prompt_tokens": tokens, "prompt": "".join(tokens),
                     "node_threshold": view.config("trace").get("threshold", 0.0),
                     "info": {"description": info["text"], "creator_name": "adag",
                              "generator": {"name": "adag", "version": __version__},
                              "create_time_ms": int(time.time() * 1000)}},
        "qParams": {"pinnedIds": [], "supernodes": [[label, *ids] for label, ids in supernodes.items()],
                    "linkType": "both"},
        "nodes": graph_nodes,
        "links": links,
    }


def graph_schema() -> dict:
    """The Neuronpedia graph schema (a copy of shared/schemas/neuronpedia-graph.schema.json)."""
    return json.loads(resources.files("adag.report").joinpath("neuronpedia-graph.schema.json").read_text())


def write_neuronpedia(run_dir: str | Path, prompt: int, out: str | Path) -> Path:
    """Write one prompt's graph, checked against the schema first."""
    import jsonschema

    graph = neuronpedia_graph(run_dir, prompt)
    jsonschema.validate(graph, graph_schema())
    path = Path(out)
    atomic_write_bytes(path, json.dumps(graph, indent=1).encode())
    return path


def export_command(run_dir: str, config: ReportConfig, prompt: int, out: str) -> Path:
    """`adag export`."""
    return write_neuronpedia(run_dir, prompt, out)


def export_summary(path: Path, run_dir: str) -> str:
    return f"graph written to {path}"
