"""The trace stage's Parquet tables, one part per batch under RUN_DIR/trace/<table>/.

prompts     one row per prompt: prompt, text (the row's prompt), traced_text (the exact text traced: the
            chat template or base template applied, decoded from token_ids), metadata (JSON), labels
            (the row's labels, as text), n_tokens, tokens, token_ids, metric, target_ids, target_tokens, target_coeffs,
            target_logits, target_probs (the model's next-token probabilities), embedding_relevance
            (one value per position: r_j = e_j . dm/de_j, total effect).
nodes       one row per kept neuron node: prompt, node (id within the prompt, ordered by layer,
            position, neuron), layer, position (unpadded), neuron, activation, attribution (RelP),
            input_profile (one value per prompt position), output_profile (one value per target).
embeddings  one row per kept embedding node (|r_j| >= threshold * |m|): prompt, position
            (unpadded), token_id, token, relevance (r_j).
edges       one row per direct edge with |weight| >= the edge threshold: prompt, source_kind
            ("embedding" | "neuron"), source (position or node), target_kind ("neuron" | "logit"),
            target (node or target rank), weight, attribution (weight * RelP of the target node, or
            weight * c_i * logit_i for a logit).

Profiles are list<float32> columns, so a prompt with K nodes and T tokens costs about 4*K*(T+k)
bytes before compression; kinds are dictionary-encoded.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa

from adag.datasets import PromptRow
from adag.trace.attribute import BatchAttribution
from adag.trace.batch import PromptBatch
from adag.trace.edges import EMBEDDING, LOGIT, NEURON, Edges

KIND_NAMES = {NEURON: "neuron", EMBEDDING: "embedding", LOGIT: "logit"}


def _lists(values: list[np.ndarray], value_type: pa.DataType) -> pa.Array:
    offsets = np.concatenate([[0], np.cumsum([len(v) for v in values])]).astype(np.int32)
    flat = np.concatenate(values) if values else np.zeros(0)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, type=value_type))


def _kinds(codes: np.ndarray) -> pa.Array:
    return pa.array([KIND_NAMES[int(code)] for code in codes], type=pa.string()).dictionary_encode()


def _numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy()


def batch_tables(result: BatchAttribution, batch: PromptBatch, prompt_ids: list[int], rows: list[PromptRow],
                 tokenizer) -> dict[str, pa.Table]:
    """Turn one batch's attribution into the trace tables, in unpadded per-prompt coordinates."""
    profiles = result.profiles
    nodes = profiles.nodes
    offsets = _numpy(batch.offsets)
    width = batch.input_ids.shape[1]
    row = _numpy(nodes.row)
    layer = _numpy(nodes.layer)
    position = _numpy(nodes.position) - offsets[row]
    neuron = _numpy(nodes.neuron)

    # Node ids: rank within the prompt by (layer, position, neuron). Batch order is (layer, row, ...).
    order = np.lexsort([neuron, position, layer, row])
    node_id = np.empty(len(row), dtype=np.int32)
    starts = np.searchsorted(row[order], np.arange(len(prompt_ids)))
    node_id[order] = np.arange(len(row)) - starts[row[order]]
    prompt = np.asarray(prompt_ids, dtype=np.int32)

    input_profile = _numpy(profiles.input_profile)
    nodes_table = pa.table({
        "prompt": prompt[row[order]],
        "node": node_id[order],
        "layer": layer[order].astype(np.int16),
        "position": position[order].astype(np.int32),
        "neuron": neuron[order].astype(np.int32),
        "activation": _numpy(profiles.activation)[order].astype(np.float32),
        "attribution": _numpy(profiles.attribution)[order].astype(np.float32),
        "input_profile": _lists([input_profile[i, offsets[row[i]]:].astype(np.float32) for i in order], pa.float32()),
        "output_profile": _lists(list(_numpy(profiles.output_profile)[order].astype(np.float32)), pa.float32()),
    })

    token_ids = _numpy(batch.input_ids)
    tokens = [token_ids[b, offsets[b]:].tolist() for b in range(len(prompt_ids))]
    target_ids = _numpy(profiles.targets.ids)
    relevance = _numpy(profiles.embedding_relevance)
    prompts_table = pa.table({
        "prompt": prompt,
        "text": [r.prompt for r in rows],
        "traced_text": [tokenizer.decode(ids) for ids in tokens],
        "metadata": [json.dumps(r.metadata) for r in rows],
        "labels": pa.array([r.labels for r in rows], type=pa.list_(pa.string())),
        "n_tokens": np.array([width - o for o in offsets], dtype=np.int32),
        "tokens": [[tokenizer.decode([t]) for t in ids] for ids in tokens],
        "token_ids": tokens,
        "metric": _numpy(profiles.metric).astype(np.float32),
        "target_ids": target_ids.tolist(),
        "target_tokens": [[tokenizer.decode([t]) for t in ids] for ids in target_ids],
        "target_coeffs": _numpy(profiles.targets.coeffs).tolist(),
        "target_logits": _numpy(profiles.target_logits).tolist(),
        "target_probs": _numpy(profiles.target_probs).tolist(),
        "embedding_relevance": [relevance[b, offsets[b]:].astype(np.float32) for b in range(len(prompt_ids))],
    })

    embedding_row = _numpy(profiles.embedding_nodes.row)
    embedding_position = _numpy(profiles.embedding_nodes.position)
    embedding_token = token_ids[embedding_row, embedding_position]
    embeddings_table = pa.table({
        "prompt": prompt[embedding_row],
        "position": (embedding_position - offsets[embedding_row]).astype(np.int32),
        "token_id": embedding_token.astype(np.int32),
        "token": [tokenizer.decode([t]) for t in embedding_token.tolist()],
        "relevance": relevance[embedding_row, embedding_position].astype(np.float32),
    })
    tables = {"prompts": prompts_table, "nodes": nodes_table, "embeddings": embeddings_table}
    if result.edges is not None:
        source_position = embedding_position - offsets[embedding_row]
        tables["edges"] = _edges_table(result.edges, prompt, node_id, source_position)
    return tables


def _ids(kind: np.ndarray, index: np.ndarray, lookups: dict[int, np.ndarray]) -> np.ndarray:
    """Per-prompt ids of edge ends: `lookups[kind]` maps a batch index to the id stored."""
    ids = index.copy()
    for code, table in lookups.items():
        chosen = kind == code
        ids[chosen] = table[index[chosen]]
    return ids


def _edges_table(edges: Edges, prompt: np.ndarray, node_id: np.ndarray, embedding_position: np.ndarray) -> pa.Table:
    """Edges with batch indices replaced by per-prompt ids: node ids, unpadded positions, target ranks."""
    source_kind, target_kind = _numpy(edges.source_kind), _numpy(edges.target_kind)
    source_id = _ids(source_kind, _numpy(edges.source), {NEURON: node_id, EMBEDDING: embedding_position})
    target_id = _ids(target_kind, _numpy(edges.target), {NEURON: node_id})  # logit targets keep their rank
    edge_prompt = prompt[_numpy(edges.row)]
    order = np.lexsort([source_id, source_kind, target_id, target_kind, edge_prompt])
    return pa.table({
        "prompt": edge_prompt[order].astype(np.int32),
        "source_kind": _kinds(source_kind[order]),
        "source": source_id[order].astype(np.int32),
        "target_kind": _kinds(target_kind[order]),
        "target": target_id[order].astype(np.int32),
        "weight": _numpy(edges.weight)[order].astype(np.float32),
        "attribution": _numpy(edges.attribution)[order].astype(np.float32),
    })
