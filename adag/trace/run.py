"""Trace a whole dataset into a run directory, batch by batch, resumably."""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

from adag.datasets import Dataset, encode_prompt, label_token_ids
from adag.errors import AdagError
from adag.models import LoadedModel
from adag.stages import writing
from adag.store import RunDir, StageWriter, check_run_target
from adag.trace.attribute import Nodes, PromptBatch, attribute, node_scores, nodes_from_keys, select_nodes
from adag.trace.config import TraceConfig
from adag.trace.tables import batch_tables

STAGE = "trace"


def run_manifest_facts(lm: LoadedModel, dataset: Dataset) -> tuple[dict, dict]:
    model = {"spec": lm.spec, "weights": lm.weights_hash, "family": lm.model.config.model_type,
             "layers": lm.n_layers, "neurons": lm.n_neurons}
    return model, {"name": dataset.name, "sha256": dataset.sha256, "rows": len(dataset)}


def trace_dataset(lm: LoadedModel, dataset: Dataset, config: TraceConfig, out: str | Path, progress: bool = True,
                  command: str | None = None) -> RunDir:
    """Trace every prompt of `dataset` into the run directory `out`; an interrupted run resumes, and a
    rerun with the same settings redoes only missing or damaged parts."""
    check_targets(lm, config)
    tokens, labels = encode_dataset(lm, dataset, config)
    run = RunDir.create(out, *run_manifest_facts(lm, dataset))
    settings = config.model_dump(mode="json")
    with run.lock():
        run.reload()
        unfinished = run.staged_attempt(STAGE)
        if run.stage_config(STAGE) not in (None, settings) or (unfinished and unfinished["config"] != settings):
            raise AdagError(f"{out} was traced with other settings; trace into a new --out directory "
                            "(or delete this one) so that no finished work is lost")
        with writing(run, STAGE, config, command) as (_, stage):
            _trace_parts(lm, dataset, config, tokens, labels, stage, progress)
    return run


def _trace_parts(lm: LoadedModel, dataset: Dataset, config: TraceConfig, tokens: list[list[int]],
                 labels: list[list[int]], stage: StageWriter, progress: bool) -> None:
    tables = ["nodes", "edges", "prompts"] if config.edges else ["nodes", "prompts"]
    plan = batch_plan(tokens, config.batch_size)
    todo = {part for part in range(len(plan)) if not all(stage.has_part(name, part) for name in tables)}
    keys = None
    if todo and config.aggregation != "none":
        keys = _dataset_keys(lm, config, tokens, labels, plan, progress)
    bar = tqdm(total=len(dataset), unit="prompt", desc="trace", disable=not progress)
    for part, prompt_ids in enumerate(plan):
        if part not in todo:
            bar.update(len(prompt_ids))
            continue
        batch = _batch(lm, tokens, labels, prompt_ids)
        if keys is None:
            scores, _ = node_scores(lm, config, batch)
            nodes = select_nodes(scores, config)
        else:
            nodes = nodes_from_keys(keys, batch, config)
        result = attribute(lm, config, batch, nodes)
        batch_result = batch_tables(result, batch, prompt_ids, [dataset.rows[i] for i in prompt_ids], lm.tokenizer,
                                    config.edge_threshold)
        for name in tables:
            stage.write_part(name, part, batch_result[name])
        bar.update(len(prompt_ids))
    bar.close()
    totals = {name: len(stage.read_table(name, columns=["prompt"])) for name in tables if name != "prompts"}
    stage.facts.update(prompts=len(dataset), **{"edges": 0, **totals})


def trace_command(run_dir: str, config: TraceConfig, model: str, dataset: str, limit: int | None = None,
                  dtype: str = "float32", device: str = "cpu") -> RunDir:
    """`adag trace`: load the dataset and the model, then trace."""
    from adag.datasets import load_dataset
    from adag.models import load_model
    from adag.stages import command_line

    check_run_target(Path(run_dir))
    rows = load_dataset(dataset, limit=limit)
    lm = load_model(model, dtype=dtype, device=device)
    command = command_line(STAGE, run_dir, config, model=model, dataset=dataset, out=run_dir, limit=limit,
                           dtype=dtype, device=device)
    return trace_dataset(lm, rows, config, run_dir, command=command)


def trace_summary(run: RunDir, run_dir: str) -> str:
    facts = run.manifest["stages"][STAGE]
    return (f"traced {facts['prompts']} prompts: {facts['nodes']} nodes, {facts['edges']} edges "
            f"in {facts['seconds']:.1f}s -> {run_dir}")


def check_targets(lm: LoadedModel, config: TraceConfig) -> None:
    """The metric's k top tokens must exist in the vocabulary."""
    vocabulary = lm.model.get_output_embeddings().weight.shape[0]
    if config.metric == "topk" and config.k > vocabulary:
        raise AdagError(f"--k {config.k} is more than the model's vocabulary of {vocabulary} tokens; "
                        f"choose --k between 1 and {vocabulary}")


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
    return PromptBatch.left_pad([tokens[i] for i in prompt_ids], [labels[i] for i in prompt_ids], lm.pad_id,
                                lm.device)


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
