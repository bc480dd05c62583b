"""A synthetic traced and clustered run, in the trace stage's table layout, for viewer tests and
benchmarks: as many prompts as wanted, most nodes at the last position (as in real runs), token
strings with whitespace, markup and long words, and no model needed."""

from __future__ import annotations

import json
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


class RoleRun:
    """Trace tables with known roles, built by hand for the describe stage's facts: prompts with their
    tokens, metadata and candidates; nodes with raw input contributions per position and direct effects
    on the candidates in logits (stored as the trace stores them: shares of the activation and of each
    target's logit)."""

    def __init__(self) -> None:
        self.prompts: list[dict] = []
        self.nodes: list[dict] = []
        self.clusters: list[int] = []

    def prompt(self, tokens: list[str], text: str, targets: list[str], logits: list[float],
               metadata: dict | None = None, labels: list[str] | None = None) -> int:
        self.prompts.append({"prompt": len(self.prompts), "text": text, "tokens": tokens,
                             "metadata": json.dumps(metadata or {}), "labels": labels or [],
                             "n_tokens": len(tokens), "metric": float(max(logits)), "target_tokens": targets,
                             "target_logits": list(logits)})
        return len(self.prompts) - 1

    def node(self, cluster: int, prompt: int, layer: int, activation: float, inputs: dict[int, float],
             effects: list[float], position: int | None = None, neuron: int | None = None) -> None:
        row = self.prompts[prompt]
        share = np.zeros(row["n_tokens"])
        for at, raw in inputs.items():
            share[at] = raw / activation
        self.nodes.append({"prompt": prompt, "layer": layer, "neuron": len(self.nodes) if neuron is None else neuron,
                           "position": row["n_tokens"] - 1 if position is None else position,
                           "activation": activation, "attribution": float(np.sum(effects)) / len(effects),
                           "input_profile": share,
                           "output_profile": np.array(effects) / np.array(row["target_logits"])})
        self.clusters.append(cluster)

    def tables(self) -> tuple[pd.DataFrame, pd.DataFrame, np.ndarray]:
        """Nodes, prompts and each node's cluster."""
        return pd.DataFrame(self.nodes), pd.DataFrame(self.prompts), np.array(self.clusters)


CHAT = ["<|im_start|>", "system", "\n", "You", " are", " a", " helpful", " assistant", ".", "<|im_end|>", "\n",
        "<|im_start|>", "user", "\n"]
TURN = ["<|im_end|>", "\n", "<|im_start|>", "assistant", "\n", "Answer", ":"]
WORDS = {"cat": "chat", "dog": "chien", "house": "maison", "tree": "arbre", "water": "eau", "bread": "pain",
         "book": "livre", "sun": "soleil"}


def translation_run() -> RoleRun:
    """A run of a non-capital task ("Translate X to French.") whose four clusters have known roles, with
    the confounds: template tokens in every prompt, nodes at the last position, two clusters with the same
    inputs and opposite outputs, per-prompt candidates with outputs in logit units, a cluster that moves
    all candidates together."""
    run = RoleRun()
    for p, (word, answer) in enumerate(WORDS.items()):
        user = ["Translate", f" {word}", " to", " French", "."]
        tokens = CHAT + user + TURN
        slot, cue, last = len(CHAT) + 1, len(tokens) - 2, len(tokens) - 1
        run.prompt(tokens, f"Translate {word} to French.", [f" {answer}", f" {word}", " The", " It"],
                   [12.0, 10.0, 8.0, 6.0], {"word": word, "answer": answer})
        strength = 1 + 0.1 * p
        # 0: the word -> raises the answer; a weak template token in every prompt, and a near-silent member
        #    with a huge share on " to" (must not matter).
        run.node(0, p, 5, 3.9, {slot: 3.0 * strength, cue: 0.3}, [3 * strength, 0, 0, 0], neuron=1)
        run.node(0, p, 6, 3.0, {slot: 2.0, last - 4: 0.2}, [2, 0, 0, 0], neuron=2)
        run.node(0, p, 6, 0.02, {slot + 1: 0.02 * 60}, [0, 0, 0, 0], neuron=3)
        # 1: the same inputs, the opposite output.
        run.node(1, p, 7, 3.5, {slot: 2.5 * strength}, [-3 * strength, 0, 0, 0], neuron=4)
        # 2: the template's "Answer" cue -> raises all candidates together (nothing relative).
        run.node(2, p, 2, 2.0, {cue: 2.0, last: 0.5}, [2.0 * strength] * 4, neuron=5)
        run.node(2, p, 3, 2.0, {cue: 1.5}, [1.5] * 4, neuron=6)
        # 3: the word, at its own position -> lowers " The".
        run.node(3, p, 1, 1.5, {slot: 1.0, slot - 1: 0.2}, [0, 0, -1.0 * strength, 0], position=slot, neuron=7)
    return run
