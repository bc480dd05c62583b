"""Trace a whole dataset into a run directory, batch by batch, resumably."""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from tqdm.auto import tqdm

from adag.datasets import Dataset, encode_prompt, label_token_ids
from adag.errors import AdagError
from adag.models import LoadedModel
from adag.stages import writing
from adag.store import RunDir, StageWriter, check_run_target
from adag.trace.attribute import (
    BatchAttribution,
    NodeKeys,
    PromptBatch,
    edges_pass,
    node_scores,
    nodes_from_keys,
    profiles_pass,
    select_keys,
    select_nodes,
)
from adag.trace.config import TraceConfig
from adag.trace.tables import batch_tables

STAGE = "trace"
TABLES = ("nodes", "embeddings", "edges", "prompts")  # prompts last: its presence marks a part done
logger = logging.getLogger(__name__)


def run_manifest_facts(lm: LoadedModel, dataset: Dataset) -> tuple[dict, dict]:
    model = {"spec": lm.spec, "weights": lm.weights_hash, "family": lm.model.config.model_type,
             "layers": lm.n_layers, "neurons": lm.n_neurons}
    return model, {"name": dataset.name, "sha256": dataset.sha256, "rows": len(dataset)}


class PhaseTimer:
    """Seconds per phase, summed over batches (waiting for the GPU before reading the clock)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        started = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds[phase] += time.perf_counter() - started


def trace_dataset(lm: LoadedModel, dataset: Dataset, config: TraceConfig, out: str | Path, progress: bool = True,
                  command: str | None = None) -> RunDir:
    """Trace every prompt of `dataset` into the run directory `out`; an interrupted run resumes, and a
    rerun with the same settings redoes only missing or damaged parts."""
    config = config.for_device(lm.device.type)
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
    tables = [name for name in TABLES if name != "edges" or config.edges]
    plan = batch_plan(tokens, config.batch_size)
    todo = {part for part in range(len(plan)) if not all(stage.has_part(name, part) for name in tables)}
    timer = PhaseTimer(lm.device)
    keys, largest_score = None, 0.0
    if todo and config.aggregation != "none":
        warn_if_unaligned(tokens, config)
        with timer("select_keys"):
            keys, largest_score = _dataset_keys(lm, config, tokens, labels, plan, progress)
    bar = tqdm(total=len(dataset), unit="prompt", desc="trace", disable=not progress)
    for part, prompt_ids in enumerate(plan):
        if part not in todo:
            bar.update(len(prompt_ids))
            continue
        batch = _batch(lm, tokens, labels, prompt_ids)
        with timer("node_scores"):
            if keys is None:
                scores, _ = node_scores(lm, config, batch)
                largest_score = max(largest_score, float(scores.max()))
                nodes = select_nodes(scores, config)
            else:
                nodes = nodes_from_keys(keys, batch, config)
        with timer("profiles"):
            profiles = profiles_pass(lm, config, batch, nodes)
        with timer("edges"):
            edges = edges_pass(lm, config, batch, profiles) if config.edges else None
        with timer("write"):
            batch_result = batch_tables(BatchAttribution(profiles, edges), batch, prompt_ids,
                                        [dataset.rows[i] for i in prompt_ids], lm.tokenizer)
            for name in tables:
                stage.write_part(name, part, batch_result[name])
        bar.update(len(prompt_ids))
    bar.close()
    totals = {name: len(stage.read_table(name, columns=["prompt"])) for name in tables if name != "prompts"}
    if totals["nodes"] == 0:
        stage.cancel()  # nothing worth keeping: a rerun with another threshold starts afresh
        raise AdagError(_no_nodes_message(config, len(dataset), largest_score))
    stage.facts.update(prompts=len(dataset), **{"edges": 0, **totals},
                       phase_seconds={phase: round(seconds, 2) for phase, seconds in timer.seconds.items()})


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
    return (f"traced {facts['prompts']} prompts: {facts['nodes']} nodes, {facts['embeddings']} embedding nodes, "
            f"{facts['edges']} edges in {facts['seconds']:.1f}s -> {run_dir}")


def check_targets(lm: LoadedModel, config: TraceConfig) -> None:
    """The metric's top tokens must exist in the vocabulary."""
    vocabulary = lm.model.get_output_embeddings().weight.shape[0]
    if config.metric == "topk" and config.n_targets > vocabulary:
        raise AdagError(f"--n-targets {config.n_targets} is more than the model's vocabulary of {vocabulary} "
                        f"tokens; choose --n-targets between 1 and {vocabulary}")


def _no_nodes_message(config: TraceConfig, prompts: int, largest_score: float) -> str:
    published = TraceConfig.model_fields["threshold"].default
    if config.selection != "threshold" or largest_score <= 0:
        return f"no node could be kept in any of the {prompts} prompts (every score is zero); check the " \
               "metric's targets and the blacklist"
    suggestion = published if largest_score > published else float(f"{largest_score / 2:.1g}")
    return (f"no node reached --threshold {config.threshold:g} in any of the {prompts} prompts (the largest "
            f"|RelP|/|m| seen was {largest_score:.3g}); rerun with --threshold {suggestion:g}")


def warn_if_unaligned(tokens: list[list[int]], config: TraceConfig) -> None:
    """Warn when dataset-level keys cannot mean the same token in every prompt.

    Keys count positions from the end. In prompts of one template (a shared beginning and ending
    around short filled-in slots) the shared ending lines up exactly and the rest shifts by at most
    the slots' length differences, as in the reference's left-padded batches. When the prompts'
    lengths differ and most of the longest prompt is not shared text, a key points at unrelated
    tokens in different prompts.
    """
    longest, shortest = max(map(len, tokens)), min(map(len, tokens))
    shared = _common_affix_length(tokens, from_end=False) + _common_affix_length(tokens, from_end=True)
    shared = min(shared, shortest)
    if longest > shortest and longest - shared > shared:
        logger.warning(
            f"warning: --aggregation {config.aggregation} keys nodes by position from the end, but the prompts "
            f"({shortest}-{longest} tokens) share only {shared} tokens of template; use --aggregation none "
            "unless they come from one template")


def _common_affix_length(tokens: list[list[int]], from_end: bool) -> int:
    """Length of the token prefix (or suffix) that every prompt shares."""
    sequences = [t[::-1] if from_end else t for t in tokens]
    length = 0
    for column in zip(*sequences):
        if len(set(column)) > 1:
            break
        length += 1
    return length


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
                  plan: list[list[int]], progress: bool) -> tuple[NodeKeys, float]:
    """Aggregate node scores over the dataset per (layer, position from the end, neuron) and select keys:
    'any' keeps a key whose score passes in any prompt (the max), 'mean' uses the mean over prompts.
    Also returns the largest aggregated score."""
    longest = max(len(t) for t in tokens)
    aggregate = torch.zeros(lm.n_layers, longest, lm.n_neurons)
    for prompt_ids in tqdm(plan, desc="select nodes", unit="batch", disable=not progress):
        scores, _ = node_scores(lm, config, _batch(lm, tokens, labels, prompt_ids))
        from_end = scores.flip(2).float().cpu()  # left padding: position from the end = width - 1 - position
        width = from_end.shape[2]
        if config.aggregation == "any":
            aggregate[:, :width] = torch.maximum(aggregate[:, :width], from_end.amax(0))
        else:
            aggregate[:, :width] += from_end.sum(0) / len(tokens)
    return select_keys(aggregate, config), float(aggregate.max())
