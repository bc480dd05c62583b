"""Export one prompt's graph to the Neuronpedia / circuit-tracer graph JSON format."""

from __future__ import annotations

import json
import time
from importlib import resources
from pathlib import Path

from adag.outputs import output_file, write
from adag.pipeline import StageResult, Summary
from adag.report.config import EXPORT_FORMATS, ExportConfig
from adag.report.data import graph_of, prompt_row
from adag.store import RunDir
from adag.version import __version__
from adag.view import RunView


def neuronpedia_graph(run_dir: str | Path, prompt: int) -> dict:
    """Nodes are MLP neurons ("layer_neuron_position"), the kept embedding nodes ("E_token_position")
    and the target logits; links are the direct edges with their attributions; cluster labels become
    node `clerp`s and `qParams.supernodes`."""
    view = RunView.open(run_dir)
    graph = graph_of(view, prompt)
    info = prompt_row(view, prompt)
    n_layers = graph.n_layers
    token_ids, target_ids = [int(t) for t in info["token_ids"]], [int(t) for t in info["target_ids"]]
    last = len(graph.tokens) - 1

    ids, graph_nodes = [], []
    logit_rank = 0
    for row in graph.nodes.itertuples():
        position = int(row.position)
        if row.kind == "embedding":
            node = f"E_{token_ids[position]}_{position}"
            entry = {"feature": None, "layer": "E", "feature_type": "embedding", "clerp": row.token,
                     "influence": abs(float(row.attribution))}
        elif row.kind == "logit":
            target = target_ids[logit_rank]
            logit_rank += 1
            node = f"{n_layers + 1}_{target}_{last}"
            entry = {"feature": target, "layer": str(n_layers + 1), "feature_type": "logit",
                     "clerp": f"output {row.token!r} (p={row.probability:.3f})", "token_prob": float(row.probability)}
        else:
            node = f"{int(row.layer)}_{int(row.neuron)}_{position}"
            entry = {"feature": int(row.neuron), "layer": str(int(row.layer)), "feature_type": "mlp neuron",
                     "clerp": row.label, "influence": abs(float(row.attribution)),
                     "activation": float(row.activation)}
        ids.append(node)
        graph_nodes.append({"node_id": node, "ctx_idx": position, "jsNodeId": node, **entry})
    links = [{"source": ids[s], "target": ids[t], "weight": float(a)}
             for s, t, a in zip(graph.edges["source"], graph.edges["target"], graph.edges["attribution"])]

    supernodes: dict[str, list[str]] = {}
    for node, label in zip(ids, graph.nodes["label"]):
        if label:
            supernodes.setdefault(label, []).append(node)
    return {
        "metadata": {"slug": f"adag-{Path(run_dir).name}-prompt{prompt}", "scan": view.model["spec"],
                     "prompt_tokens": graph.tokens, "prompt": "".join(graph.tokens),
                     "node_threshold": view.config("trace").get("threshold", 0.0),
                     "info": {"description": info["text"], "creator_name": "adag",
                              "generator": {"name": "adag", "version": __version__},
                              "create_time_ms": int(time.time() * 1000)}},
        "qParams": {"pinnedIds": [], "supernodes": [[label, *members] for label, members in supernodes.items()],
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

    output_file(out, EXPORT_FORMATS)  # before the work
    graph = neuronpedia_graph(run_dir, prompt)
    jsonschema.validate(graph, graph_schema())
    return write(out, json.dumps(graph, indent=1).encode(), EXPORT_FORMATS)


def export_run(run_dir: str, config: ExportConfig, prompt: int, out: str) -> StageResult:
    """`adag export`."""
    return StageResult(RunDir.open(run_dir), file=write_neuronpedia(run_dir, prompt, out))


def export_summary(result: StageResult) -> Summary:
    return Summary(f"graph written to {result.file}")
