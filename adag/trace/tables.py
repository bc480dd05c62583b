"""The trace stage's Parquet tables, one part per batch under RUN_DIR/trace/<table>/.

prompts  one row per prompt: prompt, text, metadata (JSON), labels (the row's labels, as text),
         n_tokens, tokens, token_ids, metric, target_ids, target_tokens, target_coeffs, target_logits,
         embedding_relevance (per position).
nodes    one row per kept node: prompt, node (id within the prompt, ordered by layer, position,
         neuron), layer, position (unpadded), neuron, activation, attribution (RelP),
         input_profile (one value per prompt position), output_profile (one value per target).
edges    one row per edge: prompt, source_kind ("embedding" | "neuron"), source (position or node),
         target_kind ("neuron" | "logit"), target (node or target rank), weight, attribution.

Profiles are list<float32> columns, so a prompt with K nodes and T tokens costs about 4*K*(T+k)
bytes before compression; kinds are dictionary-encoded.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa

from adag.datasets import PromptRow
from adag.trace.attribute import BatchAttribution, PromptBatch


def _lists(values: list[np.ndarray], value_type: pa.DataType) -> pa.Array:
    offsets = np.concatenate([[0], np.cumsum([len(v) for v in values])]).astype(np.int32)
    flat = np.concatenate(values) if values else np.zeros(0)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, type=value_type))


def _kinds(values: list[str]) -> pa.Array:
    return pa.array(values, type=pa.string()).dictionary_encode()


def batch_tables(result: BatchAttribution, batch: PromptBatch, prompt_ids: list[int], rows: list[PromptRow],
                 tokenizer, edge_threshold: float) -> dict[str, pa.Table]:
    """Turn one batch's attribution into the three tables, in unpadded per-prompt coordinates."""
    nodes = result.nodes
    offsets = batch.offsets.cpu().numpy()
    width = batch.input_ids.shape[1]
    row = nodes.row.cpu().numpy()
    layer = nodes.layer.cpu().numpy()
    position = nodes.position.cpu().numpy() - offsets[row]
    neuron = nodes.neuron.cpu().numpy()

    # Node ids: rank within the prompt by (layer, position, neuron). Batch order is (layer, row, ...).
    order = np.lexsort([neuron, position, layer, row])
    node_id = np.empty(len(row), dtype=np.int32)
    starts = np.searchsorted(row[order], np.arange(len(prompt_ids)))
    node_id[order] = np.arange(len(row)) - starts[row[order]]
    prompt = np.asarray(prompt_ids, dtype=np.int32)

    attribution = result.attribution.cpu().numpy()
    input_profile = result.input_profile.cpu().numpy()
    profiles = [input_profile[i, offsets[r]:] for i, r in enumerate(row)]
    nodes_table = pa.table({
        "prompt": prompt[row[order]],
        "node": node_id[order],
        "layer": layer[order].astype(np.int16),
        "position": position[order].astype(np.int32),
        "neuron": neuron[order].astype(np.int32),
        "activation": result.activation.cpu().numpy()[order].astype(np.float32),
        "attribution": attribution[order].astype(np.float32),
        "input_profile": _lists([profiles[i].astype(np.float32) for i in order], pa.float32()),
        "output_profile": _lists(list(result.output_profile.cpu().numpy()[order].astype(np.float32)), pa.float32()),
    })

    tokens = [batch.input_ids[b, offsets[b]:].tolist() for b in range(len(prompt_ids))]
    target_ids = result.targets.ids.cpu().numpy()
    relevance = result.embedding_relevance.cpu().numpy()
    prompts_table = pa.table({
        "prompt": prompt,
        "text": [r.prompt for r in rows],
        "metadata": [json.dumps(r.metadata) for r in rows],
        "labels": pa.array([r.labels for r in rows], type=pa.list_(pa.string())),
        "n_tokens": np.array([width - o for o in offsets], dtype=np.int32),
        "tokens": [[tokenizer.decode([t]) for t in ids] for ids in tokens],
        "token_ids": tokens,
        "metric": result.metric.cpu().numpy().astype(np.float32),
        "target_ids": target_ids.tolist(),
        "target_tokens": [[tokenizer.decode([t]) for t in ids] for ids in target_ids],
        "target_coeffs": result.targets.coeffs.cpu().numpy().tolist(),
        "target_logits": result.target_logits.cpu().numpy().tolist(),
        "embedding_relevance": [relevance[b, offsets[b]:].astype(np.float32) for b in range(len(prompt_ids))],
    })
    tables = {"prompts": prompts_table, "nodes": nodes_table}
    if result.edges is not None:
        tables["edges"] = _edges_table(result, row, position, node_id, prompt, profiles, edge_threshold)
    return tables


def _edges_table(result: BatchAttribution, row: np.ndarray, position: np.ndarray, node_id: np.ndarray,
                 prompt: np.ndarray, profiles: list[np.ndarray], threshold: float) -> pa.Table:
    attribution = result.attribution.cpu().numpy()
    parts: list[dict[str, np.ndarray]] = []

    edges = result.edges.cpu().numpy()
    source, target = edges[:, 0].astype(np.int64), edges[:, 1].astype(np.int64)
    parts.append({"prompt": prompt[row[target]], "source_kind": ["neuron"] * len(edges), "source": node_id[source],
                  "target_kind": ["neuron"] * len(edges), "target": node_id[target], "weight": edges[:, 2],
                  "attribution": edges[:, 2] * attribution[target]})

    lengths = [len(p) for p in profiles]
    node_of_entry = np.repeat(np.arange(len(profiles)), lengths)
    source_position = np.concatenate([np.arange(n) for n in lengths]) if profiles else np.zeros(0, int)
    weight = np.concatenate(profiles) if profiles else np.zeros(0)
    keep = np.abs(weight) >= threshold
    node_of_entry, source_position, weight = node_of_entry[keep], source_position[keep], weight[keep]
    parts.append({"prompt": prompt[row[node_of_entry]], "source_kind": ["embedding"] * len(weight),
                  "source": source_position, "target_kind": ["neuron"] * len(weight),
                  "target": node_id[node_of_entry], "weight": weight,
                  "attribution": weight * attribution[node_of_entry]})

    logit_weight = result.logit_edges.cpu().numpy()
    signed_logits = (result.target_logits * result.targets.coeffs).cpu().numpy()
    node, rank = np.nonzero(np.abs(logit_weight) >= threshold)
    parts.append({"prompt": prompt[row[node]], "source_kind": ["neuron"] * len(node), "source": node_id[node],
                  "target_kind": ["logit"] * len(node), "target": rank, "weight": logit_weight[node, rank],
                  "attribution": logit_weight[node, rank] * signed_logits[row[node], rank]})

    columns = {key: np.concatenate([np.asarray(p[key]) for p in parts]) for key in parts[0]}
    order = np.lexsort([columns["source"], columns["target"], columns["prompt"]])
    return pa.table({
        "prompt": columns["prompt"][order].astype(np.int32),
        "source_kind": _kinds(list(columns["source_kind"][order])),
        "source": columns["source"][order].astype(np.int32),
        "target_kind": _kinds(list(columns["target_kind"][order])),
        "target": columns["target"][order].astype(np.int32),
        "weight": columns["weight"][order].astype(np.float32),
        "attribution": columns["attribution"][order].astype(np.float32),
    })
