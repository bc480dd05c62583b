"""One prompt's attribution graph as people look at it: embedding, neuron and logit nodes joined by
direct edges; the same graph with each cluster collapsed into a supernode; and the order in which
pruning drops nodes."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pandas as pd

FEATURE_KINDS = ("neuron", "supernode")
REPLACEMENT = "\ufffd"  # what decoding one byte of a multi-byte character alone gives
PARTIAL = "\u27e8byte\u27e9"  # shown for such a byte where the character it belongs to cannot be found
CONTINUED = "\u2190"  # marks the later tokens of a character split over several


def readable_tokens(tokens: list[str], text: str) -> list[str]:
    """`tokens` with each run of byte-level pieces (tokens that decode to U+FFFD alone) shown as the text they
    make together, found in `text` (the decoded prompt) between the tokens around them: the run's first token
    shows that text, the others it marked as continued. A run that cannot be found shows PARTIAL."""
    shown, cursor, i = list(tokens), 0, 0
    while i < len(tokens):
        if REPLACEMENT not in tokens[i]:
            found = text.find(tokens[i], cursor) if tokens[i] else -1
            cursor = found + len(tokens[i]) if found >= 0 else cursor
            i += 1
            continue
        end = i
        while end < len(tokens) and REPLACEMENT in tokens[end]:
            end += 1
        stop = text.find(tokens[end], cursor) if end < len(tokens) and tokens[end] else len(text)
        merged = text[cursor:stop] if stop >= 0 else ""
        if merged.strip() and REPLACEMENT not in merged and len(merged) <= 4 * (end - i):
            shown[i:end] = [merged] + [CONTINUED + merged] * (end - i - 1)
            cursor = stop
        else:
            shown[i:end] = [PARTIAL] * (end - i)
        i = end
    return shown


def expected_answer(prompt: pd.Series) -> str:
    """The prompt's expected answer, where its dataset row says: the first label, else the metadata's `answer`
    or `correct`; "" where it says none."""
    labels = prompt.get("labels")
    if labels is not None and len(labels):
        return str(labels[0])
    try:
        metadata = json.loads(prompt.get("metadata") or "{}")
    except ValueError:
        return ""
    answer = metadata.get("answer", metadata.get("correct")) if isinstance(metadata, dict) else None
    return str(answer) if answer is not None else ""


def correct_target(targets: list[str], answer: str) -> int:
    """The index of the target token that begins the expected answer (the longest such), or -1."""
    wanted = answer.strip()
    candidates = [(len(t.strip()), -i) for i, t in enumerate(targets) if t.strip() and wanted.startswith(t.strip())]
    return -max(candidates)[1] if wanted and candidates else -1


@dataclass
class PromptGraph:
    """`nodes` has one row per node: kind ("embedding", "neuron", "supernode" or "logit"), layer
    (-1 for embeddings, the model's layer count for logits, a cluster's mean layer for supernodes),
    position, attribution (relevance for embeddings, RelP for neurons, coefficient x logit for
    logits), neuron, activation, cluster, label (the cluster's), token (byte-level pieces made readable),
    probability, members, correct (the target logit of the expected answer).
    `edges` joins node rows: source, target, weight (direct effect, as share of the target),
    attribution."""

    prompt: int
    tokens: list[str]
    n_layers: int
    nodes: pd.DataFrame
    edges: pd.DataFrame


def prompt_graph(prompt: pd.Series, nodes: pd.DataFrame, embeddings: pd.DataFrame, edges: pd.DataFrame,
                 n_layers: int, labels: dict[int, str]) -> PromptGraph:
    """Build the graph of one prompt from its rows of the trace tables (`nodes` with a `cluster`
    column, -1 where a node has none) and the clusters' labels."""
    tokens = readable_tokens([str(t) for t in prompt["tokens"]], str(prompt.get("traced_text") or ""))
    last = len(tokens) - 1
    targets = [PARTIAL if REPLACEMENT in str(t) else str(t) for t in prompt["target_tokens"]]
    correct = correct_target([str(t) for t in prompt["target_tokens"]], expected_answer(prompt))
    signed_logits = np.asarray(prompt["target_logits"], float) * np.asarray(prompt["target_coeffs"], float)
    n_emb, n_neu, n_log = len(embeddings), len(nodes), len(targets)
    frame = pd.DataFrame({
        "kind": ["embedding"] * n_emb + ["neuron"] * n_neu + ["logit"] * n_log,
        "layer": np.concatenate([np.full(n_emb, -1.0), nodes["layer"].to_numpy(float), np.full(n_log, n_layers)]),
        "position": np.concatenate([embeddings["position"].to_numpy(int), nodes["position"].to_numpy(int),
                                    np.full(n_log, last)]),
        "attribution": np.concatenate([embeddings["relevance"].to_numpy(float),
                                       nodes["attribution"].to_numpy(float), signed_logits]),
        "neuron": np.concatenate([np.full(n_emb, -1), nodes["neuron"].to_numpy(int), np.full(n_log, -1)]),
        "activation": np.concatenate([np.full(n_emb, np.nan), nodes["activation"].to_numpy(float),
                                      np.full(n_log, np.nan)]),
        "cluster": np.concatenate([np.full(n_emb, -1), nodes["cluster"].to_numpy(int), np.full(n_log, -1)]),
        "label": [""] * n_emb + [labels.get(int(c), "") for c in nodes["cluster"]] + [""] * n_log,
        "token": ([tokens[p] for p in embeddings["position"]] + [tokens[p] for p in nodes["position"]] + targets),
        "probability": np.concatenate([np.full(n_emb + n_neu, np.nan), np.asarray(prompt["target_probs"], float)]),
        "members": np.ones(n_emb + n_neu + n_log, dtype=int),
        "correct": np.r_[np.zeros(n_emb + n_neu, bool), np.arange(n_log) == correct],
    })
    row_of_position = pd.Series(np.arange(n_emb), index=embeddings["position"].to_numpy(int))
    row_of_node = pd.Series(n_emb + np.arange(n_neu), index=nodes["node"].to_numpy(int))
    from_embedding = edges["source_kind"].astype(str).to_numpy() == "embedding"
    to_logit = edges["target_kind"].astype(str).to_numpy() == "logit"
    source, target = edges["source"].to_numpy(int), edges["target"].to_numpy(int)
    source_row = np.where(from_embedding, row_of_position.reindex(source).to_numpy(),
                          row_of_node.reindex(source).to_numpy())
    target_row = np.where(to_logit, n_emb + n_neu + target, row_of_node.reindex(target).to_numpy())
    links = pd.DataFrame({"source": source_row.astype(int), "target": target_row.astype(int),
                          "weight": edges["weight"].to_numpy(float),
                          "attribution": edges["attribution"].to_numpy(float)})
    return PromptGraph(int(prompt["prompt"]), tokens, n_layers, frame, links)


def collapse_clusters(graph: PromptGraph) -> PromptGraph:
    """Each cluster's neurons become one supernode at their mean layer and dominant position (the
    position holding most of their |attribution|), with their summed attribution. Edges between two
    nodes that end in the same supernode are dropped; the others are summed: attribution adds up,
    and the weight into a group T is the |attribution|-weighted mean over T's members of the summed
    member weights, so that a group of one keeps its edges' weights."""
    nodes = graph.nodes
    grouped = (nodes["kind"] == "neuron").to_numpy() & (nodes["cluster"].to_numpy() >= 0)
    clusters = np.unique(nodes["cluster"].to_numpy()[grouped])
    kept = np.flatnonzero(~grouped)
    new_row = np.empty(len(nodes), dtype=int)
    new_row[kept] = np.arange(len(kept))
    new_row[grouped] = len(kept) + np.searchsorted(clusters, nodes["cluster"].to_numpy()[grouped])

    members = nodes[grouped].assign(strength=lambda f: f["attribution"].abs())
    by_cluster = members.groupby("cluster")
    dominant = (members.groupby(["cluster", "position"])["strength"].sum().reset_index()
                .sort_values(["cluster", "strength", "position"], ascending=[True, False, True])
                .drop_duplicates("cluster").set_index("cluster")["position"])
    supernodes = pd.DataFrame({
        "kind": "supernode", "layer": by_cluster["layer"].mean(), "position": dominant,
        "attribution": by_cluster["attribution"].sum(), "neuron": -1, "activation": np.nan,
        "cluster": clusters, "label": by_cluster["label"].first(), "token": [graph.tokens[p] for p in dominant],
        "probability": np.nan, "members": by_cluster.size(), "correct": False}).reset_index(drop=True)
    collapsed = pd.concat([nodes.iloc[kept], supernodes], ignore_index=True)

    edges = graph.edges
    strength = nodes["attribution"].abs().to_numpy()
    group_strength = np.bincount(new_row, weights=strength, minlength=len(collapsed))
    summed = pd.DataFrame({"source": new_row[edges["source"]], "target": new_row[edges["target"]],
                           "weighted": edges["weight"].to_numpy() * strength[edges["target"]],
                           "attribution": edges["attribution"].to_numpy()})
    summed = summed[summed["source"] != summed["target"]]
    summed = summed.groupby(["source", "target"], as_index=False)[["weighted", "attribution"]].sum()
    denominator = group_strength[summed["target"]]
    weight = np.divide(summed["weighted"].to_numpy(), denominator, out=np.zeros(len(summed)),
                       where=denominator > 0)
    links = pd.DataFrame({"source": summed["source"], "target": summed["target"], "weight": weight,
                          "attribution": summed["attribution"]})
    return PromptGraph(graph.prompt, graph.tokens, graph.n_layers, collapsed, links)


def pruning_order(graph: PromptGraph) -> np.ndarray:
    """For each feature node (neuron or supernode), the share of all features' |attribution| carried
    by the features stronger than it; keeping the features whose value is below s keeps the fewest
    that together carry a share s. Embedding and logit nodes, the graph's ends, get 0: they are
    always kept (the trace already kept only the embeddings that pass its threshold)."""
    nodes = graph.nodes
    order = np.zeros(len(nodes))
    strength = nodes["attribution"].abs().to_numpy()
    features = np.flatnonzero(np.isin(nodes["kind"].to_numpy(), FEATURE_KINDS))
    total = strength[features].sum()
    if len(features) and total > 0:
        ranked = features[np.argsort(-strength[features], kind="stable")]
        order[ranked] = (np.cumsum(strength[ranked]) - strength[ranked]) / total
    return order
