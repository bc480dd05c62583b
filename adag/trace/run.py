"""Trace a whole dataset into a run directory, batch by batch, resumably."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from adag.datasets import Dataset, encode_prompt, label_token_ids
from adag.errors import AdagError
from adag.models import LoadedModel
from adag.store import RunDir
from adag.trace.attribute import Nodes, PromptBatch, attribute, node_scores, nodes_from_keys, select_nodes
from adag.trace.config import TraceConfig
from adag.trace.tables import batch_tables

STAGE = "trace"


def run_manifest_facts(lm: LoadedModel, dataset: Dataset) -> tuple[dict, dict]:
    model = {"spec": lm.spec, "weights": lm.weights_hash, "family": lm.model.config.model_type,
             "layers": lm.n_layers, "neurons": lm.n_neurons}
    return model, {"name": dataset.name, "sha256": dataset.sha256, "rows": len(dataset)}


def trace_dataset(lm: LoadedModel, dataset: Dataset, config: TraceConfig, out: str, progress: bool = True) -> RunDir:
    """Trace every prompt of `dataset` into the run directory `out`; an interrupted run resumes."""
    model_facts, dataset_facts = run_manifest_facts(lm, dataset)
    run = RunDir.create(out, model_facts, dataset_facts)
    settings = config.model_dump(mode="json")
    if run.stage_config(STAGE) not in (None, settings):
        raise AdagError(f"{out} was traced with other settings; trace into a new --out directory "
                        "(or delete this one) so that no finished work is lost")
    resume = run.begin_stage(STAGE, settings)
    tokens, labels = encode_dataset(lm, dataset, config)
    plan = batch_plan(tokens, config.batch_size)
    keys = _dataset_keys(lm, config, tokens, labels, plan, progress) if config.aggregation != "none" else None

    totals = {"nodes": 0, "edges": 0}
    bar = tqdm(total=len(dataset), unit="prompt", desc="trace", disable=not progress)
    for part, prompt_ids in enumerate(plan):
        if resume and run.has_part(STAGE, "prompts", part):
            bar.update(len(prompt_ids))
            continue
        batch = _batch(lm, tokens, labels, prompt_ids)
        if keys is None:
            scores, _ = node_scores(lm, config, batch)
            nodes = select_nodes(scores, config)
        else:
            nodes = nodes_from_keys(keys, batch, config)
        result = attribute(lm, config, batch, nodes)
        tables = batch_tables(result, batch, prompt_ids, [dataset.rows[i] for i in prompt_ids], lm.tokenizer,
                              config.edge_threshold)
        for name in ("nodes", "edges", "prompts"):  # prompts last: its presence marks the part done
            if name in tables:
                run.write_part(STAGE, name, part, tables[name])
        bar.update(len(prompt_ids))
    bar.close()
    for name in totals:
        if name != "edges" or config.edges:
            totals[name] = len(run.read_table(STAGE, name, columns=["prompt"]))
    run.finish_stage(STAGE, prompts=len(dataset), **totals)
    return run


def encode_dataset(lm: LoadedModel, dataset: Dataset, config: TraceConfig) -> tuple[list[list[int]], list[list[int]]]:
    """Token ids and label ids of every row, with a clear error for a row that cannot be traced."""
    limit = getattr(lm.model.config, "max_position_embeddings", None) or getattr(lm.model.config, "n_positions", None)
    tokens, labels = [], []
    for index, row in enumerate(dataset.rows):
        ids = encode_prompt(lm.tokenizer, row)
        if limit and len(ids) > limit:
            raise AdagError(f"row {index}: the prompt is {len(ids)} tokens, longer than the model's context "
                            f"of {limit}; shorten it or remove the row")
        tokens.append(ids)
        labels.append(label_token_ids(lm.tokenizer, row, index) if config.metric != "topk" else [])
    return tokens, labels


def batch_plan(tokens: list[list[int]], batch_size: int) -> list[list[int]]:
    """Batches of similar length (less padding); the plan is deterministic, so a resumed run matches."""
    order = sorted(range(len(tokens)), key=lambda i: (len(tokens[i]), i))
    return [order[start:start + batch_size] for start in range(0, len(order), batch_size)]


def _batch(lm: LoadedModel, tokens: list[list[int]], labels: list[list[int]], prompt_ids: list[int]) -> PromptBatch:
    pad = lm.tokenizer.pad_token_id
    pad = pad if pad is not None else 0
    return PromptBatch.left_pad([tokens[i] for i in prompt_ids], [labels[i] for i in prompt_ids], pad, lm.device)


def _dataset_keys(lm: LoadedModel, config: TraceConfig, tokens: list[list[int]], labels: list[list[int]],
                  plan: list[list[int]], progress: bool) -> Nodes:
    """Aggregate node scores over the dataset per (layer, position from the end, neuron) and select keys:
    'any' keeps a key whose score passes in any prompt (the max), 'mean' uses the mean over prompts."""
    longest = max(len(t) for t in tokens)
    aggregate = torch.zeros(lm.n_layers, longest, lm.n_neurons)
    for prompt_ids in tqdm(plan, desc="select nodes", unit="batch", disable=not progress):
        scores, _ = node_scores(lm, config, _batch(lm, tokens, labels, prompt_ids))
        from_end = scores.flip(2).cpu()  # left padding: position from the end = width - 1 - position
        width = from_end.shape[2]
        if config.aggregation == "any":
            aggregate[:, :width] = torch.maximum(aggregate[:, :width], from_end.amax(0))
        else:
            aggregate[:, :width] += from_end.sum(0) / len(tokens)
    return select_nodes(aggregate[None], config)
