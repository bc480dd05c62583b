"""The describe stage: for every cluster, an input description, an output description, scores and a label."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import pyarrow as pa
from tqdm.auto import tqdm

from adag.describe.config import DESCRIBE_STAGE, DescribeConfig, DescribeOptions, parse_spec
from adag.describe.explain import (
    Excerpt,
    Explainer,
    HeldOut,
    LLMExplainer,
    Scored,
    TargetExcerpt,
    make_explainer,
    retry,
    simulated_score,
)
from adag.describe.llm import CachedBackend, make_backend
from adag.describe.records import (
    Record,
    exemplar_pool,
    load_cluster_records,
    normalised_scores,
    quantile_walk_threshold,
    sign_part,
    top_k_mask,
)
from adag.errors import AdagError
from adag.models.loading import cache_dir
from adag.pipeline import number, writing
from adag.store import RunDir, StageWriter
from adag.view import RunView

STAGE = DESCRIBE_STAGE.name
DESCRIPTIONS = pa.schema([
    ("cluster", pa.int64()), ("status", pa.string()), ("failure", pa.string()), ("label", pa.string()),
    ("input_description", pa.string()), ("input_score", pa.float64()),
    ("negative_input_description", pa.string()), ("negative_input_score", pa.float64()),
    ("output_description", pa.string()), ("output_score", pa.float64()),
])


def describe_run(run_dir: str | RunDir, config: DescribeConfig, progress: bool = True, **options: Any) -> dict:
    """Describe every cluster (one part per cluster: a rerun redoes only failed, missing or damaged
    ones). `options` are DescribeOptions: with `dry_run`, only count the calls and estimate tokens;
    nothing is written. If any cluster failed, this raises after saving the others, and the stage stays
    unfinished until a rerun describes the rest."""
    limits = DescribeOptions(**options)
    if limits.dry_run:
        view = RunView(run_dir) if isinstance(run_dir, RunDir) else RunView.open(run_dir)
        view.require("cluster")
        return _estimate(config, *_inputs(view, config))
    explainer, simulator = make_llms(config, limits, cache_dir() / "llm-cache.sqlite")
    with writing(run_dir, DESCRIBE_STAGE, config) as (view, out):
        wanted, inputs, outputs = _inputs(view, config)
        inhibitory = dict(zip(view.clusters["cluster"], view.clusters["mean_attribution"] < 0))
        todo = [c for c in wanted if not _done(out, c)]

        def work(cluster: int) -> None:
            row = describe_cluster(cluster, inputs.get(cluster, []), outputs.get(cluster, []), view.prompt_text,
                                   bool(inhibitory.get(cluster, False)), explainer, simulator, config,
                                   limits.cluster_timeout)
            out.write_part("descriptions", cluster, pa.Table.from_pylist([row], schema=DESCRIPTIONS))

        bar = tqdm(total=len(todo), unit="cluster", desc="describe", disable=None if progress else True)  # None: tty
        with ThreadPoolExecutor(limits.concurrency) as pool:
            for _ in pool.map(work, todo):
                bar.update()
        bar.close()
        ledger = pd.DataFrame([asdict(e) for e in _ledger(explainer, simulator)])
        out.write_table("ledger", ledger)
        table = out.read_table("descriptions")
        failed = table[table["status"] != "ok"].sort_values("cluster")
        if len(failed):
            raise AdagError(f"{len(failed)} of {len(table)} clusters failed (cluster {failed['cluster'].iloc[0]}: "
                            f"{failed['failure'].iloc[0]}); rerun the same command to retry them")
        out.facts.update(clusters=len(table), failed=0,
                         calls=int((~ledger["cached"]).sum()) if len(ledger) else 0,
                         cached_calls=int(ledger["cached"].sum()) if len(ledger) else 0)
    return {"clusters": len(table), "failed": 0}


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


def describe_summary(result: dict, run_dir: str) -> str:
    if "calls" in result:
        return (f"dry run: {result['clusters']} clusters would take about {result['calls']} LLM calls and "
                f"{result['estimated_tokens']} tokens (explainer {result['explainer']}, simulator "
                f"{result['simulator']}); cached calls cost nothing")
    lines = []
    for row in RunView.open(run_dir).table(STAGE, "descriptions").sort_values("cluster").itertuples():
        lines.append(f"  cluster {row.cluster:3d}  {row.label!s:28s} input r={number(row.input_score)} "
                     f"output r={number(row.output_score)}  | {row.input_description}")
    lines.append(f"described {result['clusters']} clusters ({result['failed']} failed) -> {run_dir}/{STAGE}")
    return "\n".join(lines)


def _done(out: StageWriter, cluster: int) -> bool:
    return out.has_part("descriptions", cluster) and out.read_part("descriptions", cluster)["status"].iloc[0] == "ok"


def describe_cluster(cluster: int, inputs: list[Record], outputs: list[Record], prompt_text: dict[int, str],
                     inhibitory: bool, explainer: Explainer, simulator: CachedBackend, config: DescribeConfig,
                     seconds: float) -> dict:
    """One cluster's descriptions within `seconds`; an unusable reply after all attempts, a server that
    is down or the time running out marks the cluster failed."""
    row: dict = dict.fromkeys(DESCRIPTIONS.names) | {"cluster": cluster, "status": "ok"}
    explainer, simulator = explainer.bounded(seconds), simulator.bounded(seconds)
    try:
        shown: dict[str, list] = {"input": [], "output": []}
        for sign, name in ((1, "input"), (-1, "negative_input")):
            excerpts, held_out = input_split(sign_part(inputs, sign), config)
            best = best_description(explainer, simulator, "input", excerpts, held_out, config, f"{cluster}{name}")
            row[f"{name}_description"], row[f"{name}_score"] = best.description or None, best.score
            shown["input"] = shown["input"] or excerpts
        excerpts, held_out = output_split(outputs, prompt_text, config)
        best = best_description(explainer, simulator, "output", excerpts, held_out, config, f"{cluster}output")
        row["output_description"], row["output_score"] = best.description or None, best.score
        shown["output"] = excerpts
        descriptions = {"input": row["input_description"] or "", "output": row["output_description"] or ""}
        label = retry(config.attempts, lambda attempt: explainer.label(descriptions, shown, attempt))
        row["label"] = f"not[{label}]" if inhibitory else label
    except Exception as error:  # noqa: BLE001 - any failure is recorded for this cluster; the run goes on
        row.update(status="failed", failure=f"{type(error).__name__}: {str(error).splitlines()[0][:200]}")
    return row


def input_split(records: list[Record], config: DescribeConfig) -> tuple[list[Excerpt], HeldOut]:
    """Highlighted excerpts for the explainer and held-out records for scoring (none without values)."""
    if not any(r.values.max(initial=0) > 0 for r in records):
        return [], HeldOut([], [])
    explain, held_out = exemplar_pool(records, config.top_records, config.random_records, config.seed)
    if config.highlight == "quantile":
        threshold = quantile_walk_threshold(explain + held_out, config.highlight_k)
        masks = [(r.values >= threshold) & (r.values > 0) for r in explain]
    else:
        masks = [top_k_mask(r, config.highlight_k) for r in explain]
    return ([Excerpt(r.tokens, mask) for r, mask in zip(explain, masks)],
            HeldOut([r.tokens for r in held_out], [r.values for r in held_out]))


def output_split(records: list[Record], prompt_text: dict[int, str],
                 config: DescribeConfig) -> tuple[list[TargetExcerpt], HeldOut]:
    """The prompts pushed hardest, alternately shown to the explainer and held out, with scores in [-10, 10]."""
    top = sorted(records, key=lambda r: (-float(np.abs(r.values).max(initial=0)), r.prompt))[:config.output_records]
    scores = normalised_scores(top)
    excerpts = [TargetExcerpt(prompt_text[r.prompt], r.tokens, s) for r, s in zip(top[0::2], scores[0::2])]
    held_out = HeldOut([r.tokens for r in top[1::2]], scores[1::2], [prompt_text[r.prompt] for r in top[1::2]])
    return excerpts, held_out


def best_description(explainer: Explainer, simulator: CachedBackend, kind: Literal["input", "output"],
                     excerpts: list, held_out: HeldOut, config: DescribeConfig, seed_key: str) -> Scored:
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
        kind, shown, s, attempt)) for sample, shown in enumerate(subsets)]
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


__all__ = ["DescribeConfig", "best_description", "describe_cluster", "describe_run", "input_split", "make_llms",
           "output_split"]
