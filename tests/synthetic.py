"""A synthetic traced and clustered run, in the trace stage's table layout, for viewer tests and
benchmarks: as many prompts as wanted, most nodes at the last position (as in real runs), token
strings with whitespace, markup and long words, and no model needed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from adag.cluster import ClusterConfig, cluster_run
from adag.describe.config import DESCRIBE_STAGE, DescribeConfig
from adag.pipeline import writing
from adag.store import RunDir
from adag.trace.config import TRACE_STAGE, TraceConfig

VOCABULARY = ["<|im_start|>", "user", "\n", "What", " is", " the", " capital", " of", " France", "?",
              "<|im_end|>", "assistant", "Answer", ":", " ", " <b>bold</b>", "\t", " Mississippi", " river",
              " supercalifragilistic", " Paris", " Rome", " Berlin", " Madrid", " London"]


def synthetic_run(path: str | Path, prompts: int = 4, layers: int = 12, nodes: int = 80, last_share: float = 0.7,
                  length: tuple[int, int] = (10, 18), neurons: int = 400, k: int = 5, clusters: int = 6,
                  edge_density: float = 0.15, labels: list[str] | None = None, seed: int = 0) -> RunDir:
    """Write a run with `prompts` prompts of about `nodes` nodes each (`last_share` of them at the last
    position), kept embedding nodes, direct edges of every kind, and cluster it into `clusters`.
    With `labels`, also a describe stage that gives cluster i the label labels[i % len(labels)]."""
    rng = np.random.default_rng(seed)
    run = RunDir.create(path, {"spec": "synthetic", "weights": "synthetic", "family": "llama", "layers": layers,
                               "neurons": neurons}, {"name": "synthetic", "sha256": "0" * 64, "rows": prompts})
    tables: dict[str, list[pd.DataFrame]] = {"prompts": [], "nodes": [], "embeddings": [], "edges": []}
    for prompt in range(prompts):
        for name, table in _prompt_tables(rng, prompt, layers, nodes, last_share, length, neurons, k,
                                          edge_density).items():
            tables[name].append(table)
    with writing(run, TRACE_STAGE, TraceConfig(threshold=0.01), "synthetic") as (_, stage):
        for name, parts in tables.items():
            stage.write_part(name, 0, pd.concat(parts, ignore_index=True))
        stage.facts.update(prompts=prompts, nodes=sum(map(len, tables["nodes"])),
                           edges=sum(map(len, tables["edges"])))
    run = cluster_run(str(path), ClusterConfig(k=clusters)).run
    if labels:
        _describe(run, labels)
    return run


def _describe(run: RunDir, labels: list[str]) -> None:
    ids = run.read_table("cluster", "clusters")["cluster"].to_numpy()
    chosen = [labels[c % len(labels)] for c in ids]
    # Not validated: the labels come from no backend, and the recorded settings say so.
    config = DescribeConfig.model_construct(explainer="synthetic", simulator="synthetic")
    with writing(run, DESCRIBE_STAGE, config, "synthetic") as (_, stage):
        stage.write_table("descriptions", pd.DataFrame({
            "cluster": ids, "status": "ok", "failure": None, "label": chosen,
            "input_description": [f"fires on tokens about {label}" for label in chosen], "input_score": 0.5,
            "negative_input_description": None, "negative_input_score": np.nan,
            "output_description": [f"makes the model say {label}" for label in chosen], "output_score": 0.4}))
        stage.facts.update(clusters=len(ids), failed=0)


def _prompt_tables(rng: np.random.Generator, prompt: int, layers: int, n_nodes: int, last_share: float,
                   length: tuple[int, int], neurons: int, k: int, edge_density: float) -> dict[str, pd.DataFrame]:
    n_tokens = int(rng.integers(length[0], length[1] + 1))
    token_ids = rng.integers(0, len(VOCABULARY), n_tokens)
    tokens = [VOCABULARY[t] for t in token_ids]
    last = n_tokens - 1
    position = np.where(rng.random(n_nodes) < last_share, last, rng.integers(1, n_tokens, n_nodes))
    layer = rng.integers(0, layers, n_nodes)
    neuron = rng.integers(0, neurons, n_nodes)
    keys = pd.DataFrame({"layer": layer, "position": position, "neuron": neuron}).drop_duplicates()
    keys = keys.sort_values(["layer", "position", "neuron"]).reset_index(drop=True)
    count = len(keys)
    activation = rng.normal(size=count)
    attribution = rng.normal(size=count) * rng.exponential(size=count)
    nodes = keys.assign(prompt=prompt, node=np.arange(count), activation=activation.astype(np.float32),
                        attribution=attribution.astype(np.float32),
                        input_profile=[rng.dirichlet(np.ones(n_tokens)).astype(np.float32) for _ in range(count)],
                        output_profile=[rng.normal(size=k).astype(np.float32) for _ in range(count)])

    kept = np.sort(rng.choice(np.arange(1, n_tokens), size=max(1, n_tokens // 3), replace=False))
    embeddings = pd.DataFrame({"prompt": prompt, "position": kept.astype(np.int32),
                               "token_id": token_ids[kept].astype(np.int32), "token": [tokens[p] for p in kept],
                               "relevance": (rng.normal(size=len(kept)) * 2).astype(np.float32)})

    logits = np.sort(rng.normal(12, 2, k))[::-1]
    probs = np.exp(logits - logits.max())
    probs = probs / (probs.sum() * 1.5)
    target_ids = rng.choice(len(VOCABULARY), k, replace=False)
    prompts = pd.DataFrame([{
        "prompt": prompt, "text": "".join(tokens), "metadata": "{}", "n_tokens": n_tokens, "tokens": tokens,
        "token_ids": token_ids.tolist(), "metric": float(logits.sum()), "target_ids": target_ids.tolist(),
        "target_tokens": [VOCABULARY[t] for t in target_ids], "target_coeffs": [1.0] * k,
        "target_logits": logits.tolist(), "target_probs": probs.tolist(),
        "embedding_relevance": rng.normal(size=n_tokens).astype(np.float32)}])

    layer_of, position_of = keys["layer"].to_numpy(), keys["position"].to_numpy()
    source, target = np.nonzero((layer_of[:, None] < layer_of[None, :]) & (position_of[:, None] <= position_of[None, :])
                                & (rng.random((count, count)) < edge_density))
    embedding, reached = np.nonzero((kept[:, None] <= position_of[None, :])
                                    & (rng.random((len(kept), count)) < 2 * edge_density))
    node, rank = np.nonzero(rng.random((count, k)) < edge_density)
    frames = [("neuron", source, "neuron", target, attribution[target]),
              ("embedding", kept[embedding], "neuron", reached, attribution[reached]),
              ("neuron", node, "logit", rank, logits[rank])]
    edges = []
    for source_kind, sources, target_kind, ends, end_value in frames:
        weight = rng.normal(scale=0.2, size=len(sources))
        edges.append(pd.DataFrame({"prompt": prompt, "source_kind": source_kind, "source": sources,
                                   "target_kind": target_kind, "target": ends, "weight": weight,
                                   "attribution": weight * end_value}))
    edges = pd.concat(edges, ignore_index=True)
    edges = edges.astype({"prompt": np.int32, "source": np.int32, "target": np.int32, "weight": np.float32,
                          "attribution": np.float32})
    nodes = nodes.astype({"prompt": np.int32, "node": np.int32, "layer": np.int16, "position": np.int32,
                          "neuron": np.int32})
    return {"prompts": prompts, "nodes": nodes[["prompt", "node", "layer", "position", "neuron", "activation",
                                                "attribution", "input_profile", "output_profile"]],
            "embeddings": embeddings, "edges": edges}
