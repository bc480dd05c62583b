"""The describe stage: for every cluster, an input description, an output description, scores and a label."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict

import numpy as np
import pandas as pd
import pyarrow as pa
from tqdm.auto import tqdm

from adag.describe.config import DescribeConfig
from adag.describe.explain import (
    EXPLAIN_INPUT,
    EXPLAIN_OUTPUT,
    Scored,
    UnusableReply,
    ask_description,
    input_excerpts,
    make_label,
    output_excerpts,
    score_input_description,
    score_output_description,
)
from adag.describe.llm import CachedBackend, LocalBackend, make_backend
from adag.describe.records import (
    Record,
    exemplar_pool,
    highlight,
    load_cluster_records,
    normalised_scores,
    quantile_walk_threshold,
    sign_part,
    top_k_mask,
)
from adag.models.loading import cache_dir
from adag.stages import number, writing
from adag.store import RunDir, StageWriter
from adag.view import RunView

STAGE = "describe"
DESCRIPTIONS = pa.schema([
    ("cluster", pa.int64()), ("status", pa.string()), ("failure", pa.string()), ("label", pa.string()),
    ("input_description", pa.string()), ("input_score", pa.float64()),
    ("negative_input_description", pa.string()), ("negative_input_score", pa.float64()),
    ("output_description", pa.string()), ("output_score", pa.float64()),
])


def describe_run(run_dir: str | RunDir, config: DescribeConfig, dry_run: bool = False,
                 progress: bool = True) -> dict:
    """Describe every cluster (one part per cluster: a rerun redoes only failed, missing or damaged
    ones). With `dry_run`, only count the calls and estimate tokens; nothing is written."""
    if dry_run:
        view = RunView(run_dir) if isinstance(run_dir, RunDir) else RunView.open(run_dir)
        view.require("cluster")
        return _estimate(config, *_inputs(view, config))
    with writing(run_dir, STAGE, config) as (view, out):
        cache = cache_dir() / "llm-cache.sqlite"
        explainer = CachedBackend(make_backend(config.explainer), cache)
        simulator = explainer if config.simulator == config.explainer else CachedBackend(
            make_backend(config.simulator), cache)
        wanted, inputs, outputs = _inputs(view, config)
        inhibitory = dict(zip(view.clusters["cluster"], view.clusters["mean_attribution"] < 0))
        todo = [c for c in wanted if not _done(out, c)]

        def work(cluster: int) -> None:
            row = describe_cluster(cluster, inputs.get(cluster, []), outputs.get(cluster, []), view.prompt_text,
                                   bool(inhibitory.get(cluster, False)), explainer, simulator, config)
            out.write_part("descriptions", cluster, pa.Table.from_pylist([row], schema=DESCRIPTIONS))

        bar = tqdm(total=len(todo), unit="cluster", desc="describe", disable=not progress)
        with ThreadPoolExecutor(config.concurrency) as pool:
            for _ in pool.map(work, todo):
                bar.update()
        bar.close()
        ledger = pd.DataFrame([asdict(e) for e in explainer.ledger + (simulator.ledger if simulator is not explainer
                                                                      else [])])
        out.write_table("ledger", ledger)
        table = out.read_table("descriptions")
        failed = int((table["status"] != "ok").sum())
        out.facts.update(clusters=len(table), failed=failed,
                         calls=int((~ledger["cached"]).sum()) if len(ledger) else 0,
                         cached_calls=int(ledger["cached"].sum()) if len(ledger) else 0)
    return {"clusters": len(table), "failed": failed}


def _inputs(view: RunView, config: DescribeConfig) -> tuple[list[int], dict, dict]:
    """The clusters to describe, and every cluster's input and output records."""
    wanted = config.clusters if config.clusters is not None else view.clusters["cluster"].tolist()
    view.check_clusters(wanted)
    return wanted, *load_cluster_records(view)


def describe_summary(result: dict, run_dir: str) -> str:
    if "calls" in result:
        return (f"dry run: {result['clusters']} clusters would take about {result['calls']} LLM calls and "
                f"{result['estimated_tokens']} tokens (explainer {result['explainer']}, simulator "
                f"{result['simulator']}); cached calls cost nothing")
    lines = []
    for row in RunView.open(run_dir).table(STAGE, "descriptions").sort_values("cluster").itertuples():
        if row.status != "ok":
            lines.append(f"  cluster {row.cluster:3d}  FAILED: {row.failure}")
            continue
        lines.append(f"  cluster {row.cluster:3d}  {row.label!s:28s} input r={number(row.input_score)} "
                     f"output r={number(row.output_score)}  | {row.input_description}")
    lines.append(f"described {result['clusters']} clusters ({result['failed']} failed) -> {run_dir}/{STAGE}")
    return "\n".join(lines)


def _done(out: StageWriter, cluster: int) -> bool:
    return out.has_part("descriptions", cluster) and out.read_part("descriptions", cluster)["status"].iloc[0] == "ok"


def describe_cluster(cluster: int, inputs: list[Record], outputs: list[Record], prompt_text: dict[int, str],
                     inhibitory: bool, explainer: CachedBackend, simulator: CachedBackend,
                     config: DescribeConfig) -> dict:
    """One cluster's descriptions; an unusable reply after all attempts marks the cluster failed."""
    row: dict = dict.fromkeys(DESCRIPTIONS.names) | {"cluster": cluster, "status": "ok"}
    try:
        for sign, name in ((1, "input"), (-1, "negative_input")):
            part = sign_part(inputs, sign)
            best = _describe_inputs(part, explainer, simulator, config, f"{cluster}{name}") \
                if any(r.values.max(initial=0) > 0 for r in part) else Scored("", None)
            row[f"{name}_description"], row[f"{name}_score"] = best.description or None, best.score
        best = _describe_outputs(outputs, prompt_text, explainer, simulator, config)
        row["output_description"], row["output_score"] = best.description or None, best.score
        row["label"] = _retry(config.attempts, lambda attempt: make_label(
            explainer, row["input_description"] or "", row["output_description"] or "", inhibitory))
    except Exception as error:  # noqa: BLE001 - any failure is recorded for this cluster; the run goes on
        row.update(status="failed", failure=f"{type(error).__name__}: {str(error).splitlines()[0][:200]}")
    return row


def _retry(attempts: int, ask):
    for attempt in range(attempts):
        try:
            return ask(attempt)
        except UnusableReply:
            if attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


def _candidates(explainer: CachedBackend, instruction: str, excerpts: list[str], config: DescribeConfig,
                purpose: str, seed_key: str) -> list[str]:
    rng = np.random.default_rng([config.seed, *map(ord, seed_key)])
    out = []
    for sample in range(config.samples):
        shown = rng.choice(len(excerpts), size=min(config.subset_size, len(excerpts)), replace=False)
        chosen = [excerpts[i] for i in sorted(shown)]
        out.append(_retry(config.attempts, lambda attempt, s=sample, c=chosen: ask_description(
            explainer, instruction, c, purpose, s * config.attempts + attempt, config.temperature)))
    return out


def _describe_inputs(records: list[Record], explainer: CachedBackend, simulator: CachedBackend,
                     config: DescribeConfig, seed_key: str) -> Scored:
    explain, held_out = exemplar_pool(records, config.top_records, config.random_records, config.seed)
    if config.highlight == "quantile":
        threshold = quantile_walk_threshold(explain + held_out, config.highlight_k)
        excerpts = input_excerpts(explain, threshold)
    else:
        excerpts = [highlight(r.tokens, top_k_mask(r, config.highlight_k)) for r in explain]
    scored = [Scored(d, score_input_description(simulator, d, held_out) if held_out else None)
              for d in _candidates(explainer, EXPLAIN_INPUT, excerpts, config, "explain-input", seed_key)]
    return max(scored, key=lambda s: -2.0 if s.score is None else s.score)


def _describe_outputs(records: list[Record], prompt_text: dict[int, str], explainer: CachedBackend,
                      simulator: CachedBackend, config: DescribeConfig) -> Scored:
    if not records:
        return Scored("", None)
    top = sorted(records, key=lambda r: (-float(np.abs(r.values).max()), r.prompt))[:config.output_records]
    scores = normalised_scores(top)
    explain, held_out = top[0::2], top[1::2]
    excerpts = output_excerpts(explain, scores[0::2], prompt_text)
    scored = [Scored(d, score_output_description(simulator, d, held_out, scores[1::2]) if held_out else None)
              for d in _candidates(explainer, EXPLAIN_OUTPUT, excerpts, config, "explain-output",
                                   f"out{top[0].prompt}")]
    return max(scored, key=lambda s: -2.0 if s.score is None else s.score)


def _estimate(config: DescribeConfig, clusters: list[int], inputs: dict, outputs: dict) -> dict:
    """Calls and tokens a describe run would spend, before any is sent (cache hits not subtracted)."""
    chat_simulator = not config.simulator.startswith(("local", "embed"))
    calls = tokens = 0
    for cluster in clusters:
        parts = [sign_part(inputs.get(cluster, []), s) for s in (1, -1)]
        for part in [p for p in parts if any(r.values.max(initial=0) > 0 for r in p)]:
            explain, held_out = exemplar_pool(part, config.top_records, config.random_records, config.seed)
            shown = min(config.subset_size, len(explain))
            excerpt_tokens = sum(len(r.tokens) for r in explain[:shown]) + 60
            calls += config.samples + (config.samples * len(held_out) if chat_simulator else 0)
            tokens += config.samples * (excerpt_tokens + 60)
            if chat_simulator:
                tokens += config.samples * sum(4 * len(r.tokens) + 80 for r in held_out)
        held = min(config.output_records, len(outputs.get(cluster, []))) // 2
        calls += config.samples * (1 + (held if chat_simulator else 0)) + 1
        tokens += config.samples * (30 * held + 200) + 80
    return {"clusters": len(clusters), "calls": calls, "estimated_tokens": tokens,
            "explainer": config.explainer, "simulator": config.simulator}


__all__ = ["DescribeConfig", "LocalBackend", "describe_cluster", "describe_run"]
