"""Trace a whole dataset into a run directory, batch by batch, resumably."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import torch
from tqdm.auto import tqdm

from adag.datasets import Dataset, encode_prompt, label_token_ids, uses_chat_template
from adag.errors import AdagError
from adag.models import LoadedModel
from adag.pipeline import StageResult, Summary, command_line, writing
from adag.store import RunDir, RunLocked, Shard, StageWriter, check_run_target, part_file, part_number
from adag.trace.attribute import PhaseTimer, attribute
from adag.trace.batch import NodeKeys, PromptBatch
from adag.trace.config import TRACE_STAGE, TraceConfig
from adag.trace.nodes import node_scores, pool_from_end, select_keys
from adag.trace.shards import any_rank, barrier, group_shard, pool_over_ranks, torchrun_group
from adag.trace.tables import batch_tables
from adag.view import RunView

STAGE = TRACE_STAGE.name
TABLES = ("nodes", "embeddings", "edges", "prompts")  # prompts last: its presence marks a part done
KEYS_TABLE = "dataset_keys"  # with --aggregate-over dataset: the keys kept in every prompt
logger = logging.getLogger(__name__)


def run_manifest_facts(lm: LoadedModel, dataset: Dataset) -> tuple[dict, dict]:
    model = {"spec": lm.spec, "weights": lm.weights_hash, "family": lm.model.config.model_type,
             "layers": lm.n_layers, "neurons": lm.n_neurons}
    return model, {"name": dataset.name, "sha256": dataset.sha256, "rows": len(dataset)}


def trace_dataset(lm: LoadedModel, dataset: Dataset, config: TraceConfig, out: str | Path, progress: bool = True,
                  command: str | None = None, shard: Shard | None = None) -> RunDir:
    """Trace every prompt of `dataset` into the run directory `out`; an interrupted run resumes, and a
    rerun with the same settings redoes only missing or damaged parts.

    With `shard` (or in each rank of an initialised torch.distributed group) this process traces only
    its share of the batches (`adag.trace.shards`); the last shard to finish, or rank 0, commits the
    run once every part is there."""
    config = config.for_device(lm.device.type)
    check_targets(lm, config)
    group = group_shard()
    if shard is not None and group is not None:
        raise AdagError("--shard splits a trace without torchrun; under torchrun the ranks split it already")
    shard = shard or group
    tokens, labels = encode_dataset(lm, dataset, config)
    prompt_format = "chat" if uses_chat_template(lm.tokenizer, config.prompt_format) else "plain"
    if config.aggregation != "none" and config.aggregate_over == "dataset":
        logger.warning(f"--aggregate-over dataset keeps a key that passes in any of the {len(tokens)} prompts in all "
                       "of them, so nodes per prompt (and the trace's cost) grow with the dataset")
    run = RunDir.create(out, *run_manifest_facts(lm, dataset))

    def unchanged(view: RunView) -> TraceConfig:
        """`config`, once the run is found (under its lock) to hold no trace made with other settings."""
        settings, unfinished = config.model_dump(mode="json"), view.run.staged_attempt(STAGE)
        if view.run.stage_config(STAGE) not in (None, settings) or (unfinished and unfinished["config"] != settings):
            raise AdagError(f"{out} was traced with other settings; trace into a new --out directory "
                            "(or delete this one) so that no finished work is lost")
        return config

    with writing(run, TRACE_STAGE, unchanged, command, shard) as (_, stage):
        stage.facts["prompt_format"] = prompt_format  # also left for the shard that commits
        largest_score = _trace_parts(lm, dataset, config, tokens, labels, stage, group is not None, progress)
        if shard is None:
            _record_totals(stage, config, len(dataset), largest_score, stage.facts["phase_seconds"], prompt_format)
    if group is not None:
        barrier(True)  # every rank has written its parts and let go of the lock
        if group.index == 0:
            finish_trace(run)
        barrier(True)
    elif shard is not None:
        with contextlib.suppress(RunLocked):  # another shard is still at work: it will finish the run
            finish_trace(run, wait_for_shards=True)
    run.reload()
    return run


def _trace_parts(lm: LoadedModel, dataset: Dataset, config: TraceConfig, tokens: list[list[int]],
                 labels: list[list[int]], stage: StageWriter, distributed: bool, progress: bool) -> float:
    """Trace this writer's batches that are not done yet; returns the largest node score seen."""
    tables = traced_tables(config)
    plan = batch_plan(tokens, config.batch_size)
    mine = [part for part in range(len(plan)) if stage.shard is None or stage.shard.owns(part)]
    todo = {part for part in mine if not all(stage.has_part(name, part) for name in tables)}
    timer = PhaseTimer(lm.device)
    keys, largest_score = None, 0.0
    if todo and config.aggregation != "none":
        warn_if_unaligned(tokens, plan, config)
    if config.aggregation != "none" and config.aggregate_over == "dataset" and any_rank(bool(todo), distributed):
        with timer("select_keys"):
            keys, largest_score = _dataset_keys(lm, config, tokens, labels, plan, stage, distributed, progress)
    bar = tqdm(total=sum(len(plan[part]) for part in mine), unit="prompt", desc="trace", disable=not progress)
    for part in mine:
        prompt_ids = plan[part]
        if part not in todo:
            bar.update(len(prompt_ids))
            continue
        batch = _batch(lm, tokens, labels, prompt_ids)
        result = attribute(lm, config, batch, keys, timer)
        largest_score = max(largest_score, result.largest_score)
        with timer("write"):
            batch_result = batch_tables(result, batch, prompt_ids, [dataset.rows[i] for i in prompt_ids], lm.tokenizer)
            for name in tables:
                stage.write_part(name, part, batch_result[name])
        bar.update(len(prompt_ids))
    bar.close()
    stage.facts.update(phase_seconds={phase: round(seconds, 2) for phase, seconds in timer.seconds.items()},
                       largest_score=largest_score)
    return largest_score


def _record_totals(stage: StageWriter, config: TraceConfig, prompts: int, largest_score: float,
                   phase_seconds: dict[str, float], prompt_format: str | None) -> None:
    """The facts of a complete trace (and the error for one that kept no node at all)."""
    totals = {name: stage.table_rows(name) for name in traced_tables(config) if name != "prompts"}
    if totals["nodes"] == 0:
        stage.cancel()  # nothing worth keeping: a rerun with another threshold starts afresh
        raise AdagError(_no_nodes_message(config, prompts, largest_score))
    stage.facts.clear()
    stage.facts.update(prompts=prompts, **{"edges": 0, **totals}, phase_seconds=phase_seconds)
    if prompt_format is not None:  # "chat" or "plain": how the rows became the traced text
        stage.facts["prompt_format"] = prompt_format


def finish_trace(run: RunDir, wait_for_shards: bool = False) -> bool:
    """Commit a trace written in shards once every part is there: check the parts (their hashes too),
    total the tables, record the facts. Parts still missing are an error, or with `wait_for_shards`
    (a shard that is not the last) leave the run to the last one and return False. The parts are first
    counted without the lock: each shard counts after its own parts are recorded, so the last sees all."""
    run.reload()
    attempt = run.staged_attempt(STAGE)
    if attempt is None:
        if run.stage_done(STAGE):
            return True
        raise AdagError(f"{run.path} has no unfinished trace to finish; start one with "
                        "`adag trace ... --shard I/N`")
    config = TraceConfig.model_validate(attempt["config"])
    prompts = run.manifest["dataset"]["rows"]
    parts = -(-prompts // config.batch_size)
    written = run.staged_parts(STAGE)
    if _missing_parts(lambda name, part: part_file(name, part) in written, parts, config) and wait_for_shards:
        return False
    with writing(run, TRACE_STAGE, config, attempt.get("command")) as (_, stage):
        missing = _missing_parts(stage.has_part, parts, config)
        if missing:
            raise AdagError(f"{len(missing)} of {parts} batches of {run.path} are not traced yet (batches "
                            f"{_listed(missing)}); rerun the shards that own them (batch b belongs to shard "
                            "b mod N), or `adag trace` without --shard to trace them here")
        shards = stage.shard_facts()
        phase_seconds = {}
        for facts in shards:
            for phase, seconds in facts.get("phase_seconds", {}).items():
                phase_seconds[phase] = round(phase_seconds.get(phase, 0) + seconds, 2)
        largest = max([facts.get("largest_score", 0.0) for facts in shards], default=0.0)
        formats = [facts["prompt_format"] for facts in shards if "prompt_format" in facts]
        _record_totals(stage, config, prompts, largest, phase_seconds, formats[0] if formats else None)
        stage.facts["shards"] = len(shards)
    return True


def traced_tables(config: TraceConfig) -> tuple[str, ...]:
    return tuple(name for name in TABLES if name != "edges" or config.edges)


def _missing_parts(has_part: Callable[[str, int], bool], parts: int, config: TraceConfig) -> list[int]:
    return [part for part in range(parts) if not all(has_part(name, part) for name in traced_tables(config))]


def _listed(numbers: list[int], shown: int = 10) -> str:
    return ", ".join(map(str, numbers[:shown])) + (", ..." if len(numbers) > shown else "")


def trace_run(run_dir: str | None, config: TraceConfig, model: str | None = None, dataset: str | None = None,
              limit: int | None = None, dtype: str = "float32", device: str = "cpu", shard: str | None = None,
              finish: str | None = None, lm: LoadedModel | None = None) -> StageResult:
    """`adag trace`: load the dataset and the model (unless `lm`, already loaded), then trace (under
    torchrun: this rank's share); or with `finish`, commit a run traced in shards."""
    from adag.datasets import load_dataset
    from adag.models import load_model

    if finish is not None:
        if any(given is not None for given in (model, dataset, run_dir, shard)):
            raise AdagError("--finish RUN takes no --model, --dataset, --out or --shard: the shards' settings are "
                            "in RUN")
        run = RunDir.open(finish)
        finish_trace(run)
        return StageResult(run)
    if model is None or dataset is None or run_dir is None:
        raise AdagError("adag trace needs --model, --dataset and --out (or --finish RUN to finish a sharded run)")
    check_run_target(Path(run_dir))
    this_shard = parse_shard(shard)
    rows = load_dataset(dataset, limit=limit)
    command = command_line(TRACE_STAGE, run_dir, config, model=model, dataset=dataset, out=run_dir, limit=limit,
                           dtype=dtype, device=device)
    with torchrun_group(device) as rank_device:
        lm = lm or load_model(model, dtype=dtype, device=rank_device)
        return StageResult(trace_dataset(lm, rows, config, run_dir, command=command, shard=this_shard))


def parse_shard(text: str | None) -> Shard | None:
    """`I/N` (from 0) as a Shard."""
    if text is None:
        return None
    index, _, count = text.partition("/")
    if not (index.isdigit() and count.isdigit() and int(index) < int(count)):
        raise AdagError(f"--shard {text}: write I/N with 0 <= I < N, e.g. --shard $SLURM_ARRAY_TASK_ID/8")
    return Shard(int(index), int(count))


def trace_summary(result: StageResult) -> Summary:
    run = result.run
    if not run.stage_done(STAGE):
        attempt = run.staged_attempt(STAGE) or {"config": {"batch_size": 1}}
        parts = -(-run.manifest["dataset"]["rows"] // attempt["config"]["batch_size"])
        done = len({part_number(file) for file in run.staged_parts(STAGE) if file.startswith("prompts/")})
        return Summary(f"traced this shard's batches into {run.path}: {done} of {parts} batches done; the last "
                       f"shard (or `adag trace --finish {run.path}`) finishes the run")
    facts = run.manifest["stages"][STAGE]
    return Summary(f"traced {facts['prompts']} prompts: {facts['nodes']} nodes, {facts['embeddings']} embedding "
                   f"nodes, {facts['edges']} edges in {facts['seconds']:.1f}s -> {run.path}")


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


def warn_if_unaligned(tokens: list[list[int]], plan: list[list[int]], config: TraceConfig) -> None:
    """Warn when pooled keys cannot mean the same token in every prompt they are pooled over (the
    prompts of each batch, or of the whole dataset).

    Keys count positions from the end. In prompts of one template (a shared beginning and ending
    around short filled-in slots) the shared ending lines up exactly and the rest shifts by at most
    the slots' length differences, as in the reference's left-padded batches. When the prompts'
    lengths differ and most of the longest prompt is not shared text, a key points at unrelated
    tokens in different prompts.
    """
    groups = [list(range(len(tokens)))] if config.aggregate_over == "dataset" else plan
    for group in groups:
        pooled = [tokens[i] for i in group]
        longest, shortest = max(map(len, pooled)), min(map(len, pooled))
        shared = _common_affix_length(pooled, from_end=False) + _common_affix_length(pooled, from_end=True)
        shared = min(shared, shortest)
        if longest > shortest and longest - shared > shared:
            logger.warning(
                f"--aggregation {config.aggregation} keys nodes by position from the end, but prompts pooled over "
                f"the {config.aggregate_over} ({shortest}-{longest} tokens) share only {shared} tokens of template; "
                "use --aggregation none unless they come from one template")
            return


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
        ids = encode_prompt(lm.tokenizer, row, config.prompt_format, config.base_template)
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
                  plan: list[list[int]], stage: StageWriter, distributed: bool,
                  progress: bool) -> tuple[NodeKeys, float]:
    """Keys selected from node scores pooled over the whole dataset per (layer, position from the end,
    neuron) ('any': the max over prompts, 'mean': the mean), and the largest pooled score.

    Computed once per run and published in the stage (`dataset_keys`), so that every shard and every
    resumed attempt traces the same keys. The ranks of a process group each pool their own batches
    and combine them; an independent shard pools the whole dataset itself (the node pass is a small
    part of a trace's cost) unless the keys are published already."""
    if any_rank(not stage.has_table(KEYS_TABLE), distributed):
        shard = stage.shard if distributed else None
        batches = [ids for part, ids in enumerate(plan) if shard is None or shard.owns(part)]
        pooled = torch.zeros(lm.n_layers, max(len(t) for t in tokens), lm.n_neurons)
        for prompt_ids in tqdm(batches, desc="select nodes", unit="batch", disable=not progress):
            scores, _ = node_scores(lm, config, _batch(lm, tokens, labels, prompt_ids))
            batch_pooled = pool_from_end(scores, config, len(tokens)).float().cpu()
            width = batch_pooled.shape[1]
            if config.aggregation == "any":
                pooled[:, :width] = torch.maximum(pooled[:, :width], batch_pooled)
            else:
                pooled[:, :width] += batch_pooled
        if distributed:
            pool_over_ranks(pooled, config.aggregation)
        keys = select_keys(pooled, config)
        table = pa.table({"layer": keys.layer.numpy(), "from_end": keys.from_end.numpy(),
                          "neuron": keys.neuron.numpy()}, metadata={"largest_score": str(float(pooled.max()))})
        stage.publish_table(KEYS_TABLE, table)
    published = stage.read_table(KEYS_TABLE)
    largest = float(stage.table_metadata(KEYS_TABLE)["largest_score"])
    keys = NodeKeys(*(torch.tensor(published[column].to_numpy(), device=lm.device)
                      for column in ("layer", "from_end", "neuron")))
    return keys, largest
