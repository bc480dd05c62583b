"""The describe stage: for every cluster, an input description, an output description, scores and a label."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import pyarrow as pa
from tqdm.auto import tqdm

from adag.describe.config import DESCRIBE_STAGE, DescribeConfig, DescribeOptions
from adag.describe.explain import (
    Excerpt,
    Explainer,
    HeldOut,
    LLMExplainer,
    Scored,
    TargetExcerpt,
    make_explainer,
    retry,
    signed_label,
    simulated_score,
)
from adag.describe.facts import ClusterFacts, cluster_facts
from adag.describe.records import (
    Record,
    exemplar_pool,
    load_cluster_records,
    normalised_scores,
    quantile_masks,
    shown_text,
    sign_part,
    top_k_mask,
)
from adag.describe.roles import Roles, prompt_roles
from adag.errors import AdagError
from adag.llm import CachedBackend, LedgerEntry, llm_cache_path, make_backend
from adag.llm.roles import parse_spec
from adag.outputs import printable
from adag.pipeline import StageResult, Summary, number, writing
from adag.store import DamagedFile, RunDir, StageWriter
from adag.subsets import kept_clusters
from adag.view import RunView

STAGE = DESCRIBE_STAGE.name
DESCRIPTIONS = pa.schema([
    ("cluster", pa.int64()), ("status", pa.string()), ("failure", pa.string()), ("label", pa.string()),
    ("input_description", pa.string()), ("input_score", pa.float64()),
    ("negative_input_description", pa.string()), ("negative_input_score", pa.float64()),
    ("output_description", pa.string()), ("output_score", pa.float64()),
    # What holds across the cluster's prompts, one line each (adag.describe.facts), and the excerpts the
    # explainer was shown as JSON: [{prompt, part: input+|input-|output, tokens, values, highlight}].
    ("facts", pa.list_(pa.string())), ("exemplars", pa.string()),
])


@dataclass
class ClusterData:
    """What describing one cluster needs from the run."""

    inputs: list[Record]
    outputs: list[Record]
    facts: ClusterFacts | None
    roles: Roles | None
    shown: dict[int, str]  # each prompt's shown part (the user's turn and the seed response)
    inhibitory: bool


def describe_run(run_dir: str | RunDir, config: DescribeConfig, progress: bool = True,
                 **options: Any) -> StageResult:
    """Describe every cluster (one part per cluster: a rerun redoes only failed, missing or damaged
    ones). `options` are DescribeOptions: with `dry_run`, only count the calls and estimate tokens;
    nothing is written. If any cluster failed, this raises after saving the others, and the stage stays
    unfinished until a rerun describes the rest."""
    limits = DescribeOptions(**options)
    if limits.dry_run:
        view = RunView(run_dir) if isinstance(run_dir, RunDir) else RunView.open(run_dir)
        view.require("cluster")
        return StageResult(view.run, _estimate(config, *_inputs(view, config)))
    explainer, simulator = make_llms(config, limits, llm_cache_path())
    asked, settled = config, {}

    def recorded(view: RunView) -> DescribeConfig:
        settled["config"], settled["kept"] = _added_to_finished(view, asked)
        return settled["config"]

    with writing(run_dir, DESCRIBE_STAGE, recorded) as (view, out):
        config, kept = settled["config"], settled["kept"]
        wanted, inputs, outputs = _inputs(view, config)
        _keep_finished(view, out, kept)
        inhibitory = dict(zip(view.clusters["cluster"], view.clusters["mean_attribution"] < 0))
        todo = [c for c in wanted if not _done(out, c)]
        roles = prompt_roles(view.prompts)
        facts = cluster_facts(view.nodes, view.prompts, view.node_cluster,
                              view.config("trace")["keep_first_position"], roles) if todo else {}
        shown = shown_text(view.prompts)

        def work(cluster: int) -> None:
            data = ClusterData(inputs.get(cluster, []), outputs.get(cluster, []), facts.get(cluster), roles,
                               shown, bool(inhibitory.get(cluster, False)))
            row = describe_cluster(cluster, data, explainer, simulator, config, limits.cluster_timeout)
            out.write_part("descriptions", cluster, pa.Table.from_pylist([_printable(row)], schema=DESCRIPTIONS))
            if not out.repairing:  # staged: an interrupted invocation's calls (paid for) still count
                ledger.save(_ledger(explainer, simulator))

        ledger = Ledger(view, out, kept)
        bar = tqdm(total=len(todo), unit="cluster", desc="describe",
                   disable=None if progress else True)  # None: only on a terminal
        try:
            with ThreadPoolExecutor(limits.concurrency) as pool:
                for _ in pool.map(work, todo):
                    bar.update()
        finally:
            bar.close()
            if not out.repairing:  # also when interrupted: the staged attempt keeps the calls made
                ledger.save(_ledger(explainer, simulator))
        calls = ledger.save(_ledger(explainer, simulator))
        table = out.read_table("descriptions")
        failed = table[table["status"] != "ok"].sort_values("cluster")
        if len(failed):
            raise AdagError(f"{len(failed)} of {len(table)} clusters failed (cluster {failed['cluster'].iloc[0]}: "
                            f"{failed['failure'].iloc[0]}); rerun the same command to retry them")
        out.facts.update(clusters=len(table), failed=0,
                         calls=int((~calls["cached"]).sum()) if len(calls) else 0,
                         cached_calls=int(calls["cached"].sum()) if len(calls) else 0)
    return StageResult(view.run, {"clusters": len(table), "failed": 0})


# Partial reruns (adag.subsets): describing some clusters adds them to the finished descriptions.

LABEL_LENGTH = 80  # characters of a stored label; longer LLM replies are cut
LEDGER_COLUMNS = [field.name for field in fields(LedgerEntry)]


def _added_to_finished(view: RunView, config: DescribeConfig) -> tuple[DescribeConfig, set[int]]:
    """The config to record (the clusters of the finished descriptions and those asked for; None when that
    is every cluster) and the finished clusters to keep."""
    try:
        finished = view.table(STAGE, "descriptions", columns=["cluster"])
    except DamagedFile:
        finished = None  # a damaged part: the same command repairs it, keeping the parts that are whole
    held = set() if finished is None else {int(c) for c in finished["cluster"]}
    every = {int(c) for c in view.clusters["cluster"]}
    chosen = every if config.clusters is None else set(config.clusters)
    union = sorted(held | chosen)
    record = config.model_copy(update={"clusters": None if set(union) == every else union})
    kept = kept_clusters(view.run, DESCRIBE_STAGE, config, record, {"clusters"}, chosen, held,
                         "describe every cluster with the new settings (without --clusters)")
    return (record, kept) if kept else (config, kept)


def _keep_finished(view: RunView, out: StageWriter, kept: set[int]) -> None:
    """Carry the kept clusters' finished descriptions into a new attempt (a repair keeps them in place)."""
    if not kept or out.repairing:
        return
    finished = view.table(STAGE, "descriptions")
    for cluster in sorted(kept):
        if not out.has_part("descriptions", cluster):
            rows = finished[finished["cluster"] == cluster]
            out.write_part("descriptions", cluster, pa.Table.from_pandas(rows, schema=DESCRIPTIONS,
                                                                          preserve_index=False))


class Ledger:
    """The ledger of every invocation that made these descriptions: the earlier ones' (of this attempt, an
    interrupted one it resumes, or the finished descriptions it adds to) and this one's, numbered by
    `invocation`. Saved after every cluster, so that calls made (and paid for) before an interruption are
    counted by the rerun that finishes; written only when this invocation called anything, so that a rerun
    with nothing to do changes nothing."""

    def __init__(self, view: RunView, out: StageWriter, kept: set[int]):
        earlier = out.read_table("ledger") if out.has_table("ledger") else view.table(STAGE, "ledger") if kept else None
        self.earlier = pd.DataFrame() if earlier is None else earlier
        numbers = self.earlier.get("invocation", pd.Series(dtype=float)).dropna()
        self.invocation = int(numbers.max()) + 1 if len(numbers) else 0
        self.out = out
        self._guard = threading.Lock()

    def save(self, calls: list) -> pd.DataFrame:
        with self._guard:
            if not calls and self.out.repairing:
                return self.earlier
            now = pd.DataFrame([asdict(e) for e in calls], columns=LEDGER_COLUMNS).assign(invocation=self.invocation)
            ledger = pd.concat([self.earlier, now], ignore_index=True) if len(self.earlier) else now
            self.out.write_table("ledger", ledger)
            return ledger


def _printable(row: dict) -> dict:
    """A description row as stored: no control characters in its texts, the label cut to LABEL_LENGTH."""
    texts = {key: printable(value) if isinstance(value, str) else [printable(line) for line in value]
             for key, value in row.items() if isinstance(value, str) or key == "facts" and value is not None}
    if texts.get("label"):
        texts["label"] = texts["label"][:LABEL_LENGTH]
    return row | texts


def make_llms(config: DescribeConfig, limits: DescribeOptions, cache_path: Path) -> tuple[Explainer, CachedBackend]:
    """The explainer and the simulator; one backend (one ledger, one endpoint state) when both are the same."""
    explainer = make_explainer(config.explainer, cache_path, config.temperature, limits.request_timeout,
                               limits.retries)
    if isinstance(explainer, LLMExplainer) and config.simulator == config.explainer:
        return explainer, explainer.llm
    return explainer, CachedBackend(make_backend(config.simulator, "simulator"), cache_path, limits.request_timeout,
                                    limits.retries)


def _ledger(explainer: Explainer, simulator: CachedBackend) -> list:
    llms = [explainer.llm] if isinstance(explainer, LLMExplainer) else []
    return [entry for llm in dict.fromkeys([*llms, simulator]) for entry in llm.ledger]


def _inputs(view: RunView, config: DescribeConfig) -> tuple[list[int], dict, dict]:
    """The clusters to describe, and every cluster's input and output records."""
    wanted = config.clusters if config.clusters is not None else view.clusters["cluster"].tolist()
    view.check_clusters(wanted)
    return wanted, *load_cluster_records(view)


def describe_summary(stage_result: StageResult) -> Summary:
    result, run_dir = stage_result.facts, stage_result.run.path
    if "calls" in result:
        return Summary(f"dry run: {result['clusters']} clusters would take about {result['calls']} LLM calls "
                       f"and {result['estimated_tokens']} tokens (explainer {result['explainer']}, simulator "
                       f"{result['simulator']}); cached calls cost nothing")
    lines = []
    for row in RunView(stage_result.run).table(STAGE, "descriptions").sort_values("cluster").itertuples():
        lines.append(f"  cluster {row.cluster:3d}  {row.label!s:28s} input r={number(row.input_score)} "
                     f"output r={number(row.output_score)}  | {row.input_description}")
    lines.append(f"described {result['clusters']} clusters ({result['failed']} failed) -> {run_dir}/{STAGE}")
    return Summary("\n".join(lines))


def _done(out: StageWriter, cluster: int) -> bool:
    if not out.has_part("descriptions", cluster):
        return False
    part = out.read_part("descriptions", cluster)
    return "facts" in part and part["status"].iloc[0] == "ok"


def describe_cluster(cluster: int, data: ClusterData, explainer: Explainer, simulator: CachedBackend,
                     config: DescribeConfig, seconds: float) -> dict:
    """One cluster's descriptions within `seconds`; an unusable reply after all attempts, a server that
    is down or the time running out marks the cluster failed."""
    row: dict = dict.fromkeys(DESCRIPTIONS.names) | {"cluster": cluster, "status": "ok"}
    row["facts"] = data.facts.lines() if data.facts else []
    explainer, simulator = explainer.bounded(seconds), simulator.bounded(seconds)
    try:
        shown: dict[str, list] = {}
        for sign, kind, name in ((1, "input", "input"), (-1, "negative", "negative_input")):
            excerpts, held_out = input_split(sign_part(data.inputs, sign), config, data.roles)
            best = best_description(explainer, simulator, kind, excerpts, held_out, config, f"{cluster}{name}",
                                    data.facts)
            row[f"{name}_description"], row[f"{name}_score"] = best.description or None, best.score
            shown[kind] = excerpts
        excerpts, held_out = output_split(data.outputs, data.shown, config, data.roles)
        best = best_description(explainer, simulator, "output", excerpts, held_out, config, f"{cluster}output",
                                data.facts)
        row["output_description"], row["output_score"] = best.description or None, best.score
        shown["output"] = excerpts
        row["exemplars"] = json.dumps(exemplars(shown))
        descriptions = {"input": row["input_description"] or "", "output": row["output_description"] or ""}
        label = retry(config.attempts, lambda attempt: explainer.label(descriptions, shown, attempt, data.facts))
        row["label"] = label if explainer.signs_labels else signed_label(label, data.inhibitory)
    except Exception as error:  # noqa: BLE001 - any failure is recorded for this cluster; the run goes on
        row.update(status="failed", failure=f"{type(error).__name__}: {str(error).splitlines()[0][:200]}")
    return row


def exemplars(shown: dict[str, list]) -> list[dict]:
    """The excerpts shown to the explainer, as the report shows them (values rounded for size)."""
    items = []
    for kind, part in (("input", "input+"), ("negative", "input-")):
        items += [{"prompt": e.prompt, "part": part, "tokens": e.tokens, "values": np.round(e.values, 4).tolist(),
                   "highlight": e.marked.tolist()} for e in shown.get(kind, [])]
    for e in shown.get("output", []):
        strongest = np.abs(e.values) == np.abs(e.values).max(initial=0) if len(e.values) else np.zeros(0, bool)
        items.append({"prompt": e.prompt_id, "part": "output", "tokens": e.targets,
                      "values": np.round(e.values, 4).tolist(), "highlight": strongest.tolist()})
    return items


def input_split(records: list[Record], config: DescribeConfig,
                roles: Roles | None = None) -> tuple[list[Excerpt], HeldOut]:
    """Highlighted excerpts for the explainer and held-out records for scoring (none without values)."""
    if not any(r.values.max(initial=0) > 0 for r in records):
        return [], HeldOut([], [])
    explain, held_out = exemplar_pool(records, config.top_records, config.random_records, config.seed)
    return input_excerpts(explain, config, roles), HeldOut([r.tokens for r in held_out], [r.values for r in held_out])


def input_excerpts(explain: list[Record], config: DescribeConfig, roles: Roles | None = None) -> list[Excerpt]:
    """The explainer's records, highlighted: the threshold is computed on these records alone, and each
    excerpt shows at least its top token."""
    if config.highlight == "quantile":
        masks = quantile_masks(explain, config.highlight_k)
    else:
        masks = [top_k_mask(r, config.highlight_k) for r in explain]
    return [Excerpt(r.tokens, mask, r.values, roles.tokens[r.prompt][r.start:] if roles else None, r.prompt)
            for r, mask in zip(explain, masks)]


def output_split(records: list[Record], prompt_text: dict[int, str], config: DescribeConfig,
                 roles: Roles | None = None) -> tuple[list[TargetExcerpt], HeldOut]:
    """The prompts pushed hardest (in logits), alternately shown to the explainer and held out;
    `prompt_text` is what each prompt shows (the user's turn and the seed response)."""
    top = sorted(records, key=lambda r: (-float(np.abs(r.values).max(initial=0)), r.prompt))[:config.output_records]
    return output_excerpts(top[0::2], prompt_text, roles), output_held_out(top[1::2], prompt_text)


def output_excerpts(records: list[Record], prompt_text: dict[int, str],
                    roles: Roles | None = None) -> list[TargetExcerpt]:
    """Each prompt's candidates with scores in [-10, 10] (scaled over these records alone) and logits."""
    return [TargetExcerpt(prompt_text[r.prompt], r.tokens, s, r.values, roles.targets[r.prompt] if roles else None,
                          r.prompt) for r, s in zip(records, normalised_scores(records))]


def output_held_out(records: list[Record], prompt_text: dict[int, str]) -> HeldOut:
    return HeldOut([r.tokens for r in records], normalised_scores(records), [prompt_text[r.prompt] for r in records])


def best_description(explainer: Explainer, simulator: CachedBackend, kind: Literal["input", "negative", "output"],
                     excerpts: list, held_out: HeldOut, config: DescribeConfig, seed_key: str,
                     facts: ClusterFacts | None = None) -> Scored:
    """Candidates on random subsets of the excerpts (one from all of them for a deterministic explainer),
    each scored on the held-out records; the best one."""
    if not excerpts:
        return Scored("", None)
    if explainer.deterministic:
        subsets = [excerpts]
    else:
        rng = np.random.default_rng([config.seed, *map(ord, seed_key)])
        size = min(config.subset_size, len(excerpts))
        subsets = [[excerpts[i] for i in sorted(rng.choice(len(excerpts), size=size, replace=False))]
                   for _ in range(config.samples)]
    candidates = [retry(config.attempts, lambda attempt, s=sample, shown=shown: explainer.describe(
        kind, shown, s, attempt, facts)) for sample, shown in enumerate(subsets)]
    scored = [Scored(d, simulated_score(simulator, kind, d, held_out, config.attempts) if len(held_out) and d
                     else None) for d in dict.fromkeys(candidates)]
    return max(scored, key=lambda s: -2.0 if s.score is None else s.score)


def _estimate(config: DescribeConfig, clusters: list[int], inputs: dict, outputs: dict) -> dict:
    """Calls and tokens a describe run would spend, before any is sent (cache hits not subtracted)."""
    llm_explainer = parse_spec(config.explainer, "explainer").kind != "stats"
    samples = config.samples if llm_explainer else 1
    chat_simulator = parse_spec(config.simulator, "simulator").kind in ("openai", "anthropic")
    calls = tokens = 0
    for cluster in clusters:
        parts = [sign_part(inputs.get(cluster, []), s) for s in (1, -1)]
        for part in [p for p in parts if any(r.values.max(initial=0) > 0 for r in p)]:
            explain, held_out = exemplar_pool(part, config.top_records, config.random_records, config.seed)
            shown = min(config.subset_size, len(explain))
            excerpt_tokens = sum(len(r.tokens) for r in explain[:shown]) + 60
            calls += samples * (llm_explainer + (len(held_out) if chat_simulator else 0))
            tokens += llm_explainer * samples * (excerpt_tokens + 400)
            if chat_simulator:
                tokens += samples * sum(6 * len(r.tokens) + 120 for r in held_out)
        held = min(config.output_records, len(outputs.get(cluster, []))) // 2
        calls += samples * (llm_explainer + (held if chat_simulator else 0)) + llm_explainer
        tokens += samples * (llm_explainer * 400 + (60 * held if chat_simulator else 0)) + 80 * llm_explainer
    return {"clusters": len(clusters), "calls": calls, "estimated_tokens": tokens,
            "explainer": config.explainer, "simulator": config.simulator}


__all__ = ["DescribeConfig", "best_description", "describe_cluster", "describe_run", "input_excerpts", "input_split",
           "make_llms", "output_excerpts", "output_held_out", "output_split"]
