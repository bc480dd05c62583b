"""The describe stage: for every cluster, an input description, an output description, scores and a label."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from typing import Literal

import numpy as np
import pandas as pd
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, field_validator
from tqdm.auto import tqdm

from adag.cluster.run import node_clusters
from adag.describe.explain import (
    Excerpt,
    Explainer,
    LLMExplainer,
    Scored,
    TargetExcerpt,
    make_explainer,
    retry,
    simulated_score,
)
from adag.describe.llm import CachedBackend, make_backend, parse_spec
from adag.describe.records import (
    Record,
    exemplar_pool,
    input_records,
    normalised_scores,
    output_records,
    quantile_walk_threshold,
    sign_part,
    top_k_mask,
)
from adag.errors import AdagError
from adag.models.loading import cache_dir
from adag.store import RunDir

STAGE = "describe"
DESCRIPTIONS = pa.schema([
    ("cluster", pa.int64()), ("status", pa.string()), ("failure", pa.string()), ("label", pa.string()),
    ("input_description", pa.string()), ("input_score", pa.float64()),
    ("negative_input_description", pa.string()), ("negative_input_score", pa.float64()),
    ("output_description", pa.string()), ("output_score", pa.float64()),
])


class DescribeConfig(BaseModel):
    """How clusters are described; every field is also a CLI option of `adag describe`."""

    model_config = ConfigDict(extra="forbid")

    explainer: str = Field("stats", description=(
        "who writes descriptions: stats (offline summary of the highlighted tokens, no LLM), local[:MODEL], "
        "openai:MODEL[@URL] (also vLLM, Ollama, llama.cpp server) or anthropic:MODEL[@URL]"))
    simulator: str = Field("embed:minilm", description=(
        "who scores descriptions on held-out records: embed:minilm (offline sentence embeddings), "
        "local[:MODEL], openai:MODEL[@URL] or anthropic:MODEL[@URL]"))
    samples: int = Field(5, ge=1, description="candidate descriptions per explanation (an LLM explainer)")
    subset_size: int = Field(15, ge=1, description="excerpts shown to an LLM explainer per candidate")
    top_records: int = Field(80, ge=1, description="records with the largest values in each pool")
    random_records: int = Field(20, ge=0, description="random further records in each pool, as negatives")
    output_records: int = Field(20, ge=2, description="prompts with the largest push used for output descriptions")
    highlight: Literal["quantile", "topk"] = Field("quantile", description=(
        "how tokens are highlighted: quantile (quantile walk) or topk (each record's k largest)"))
    highlight_k: int = Field(3, ge=1, description=(
        "distinct highlighted strings (quantile) or tokens per record (topk); 3 scores best in "
        "benchmarks/describe_eval.py, where k=1 highlights too few tokens"))
    temperature: float = Field(1.0, ge=0, description="sampling temperature of an LLM explainer")
    attempts: int = Field(3, ge=1, description="tries for an unusable LLM reply before the cluster is marked failed")
    request_timeout: float = Field(120.0, gt=0, description="seconds to wait for one LLM reply")
    retries: int = Field(3, ge=0, description=(
        "resends of a request that failed on the server's side (timeout, refused, 429, 5xx) before the "
        "endpoint counts as down and the remaining clusters fail at once"))
    cluster_timeout: float = Field(900.0, gt=0, description=(
        "seconds after which a cluster is given up (marked failed, retried on the next run)"))
    concurrency: int = Field(4, ge=1, description="clusters described at once")
    clusters: list[int] | None = Field(None, description="cluster ids to describe (default: all)")
    seed: int = Field(0, description="seed of the record pools and the explainer's excerpt subsets")

    @field_validator("explainer")
    @classmethod
    def _can_explain(cls, spec: str) -> str:
        parse_spec(spec, "explainer")
        return spec

    @field_validator("simulator")
    @classmethod
    def _can_simulate(cls, spec: str) -> str:
        parse_spec(spec, "simulator")
        return spec


def describe_run(run_dir: str, config: DescribeConfig, dry_run: bool = False, progress: bool = True) -> dict:
    """Describe every cluster. With `dry_run`, only count the calls and estimate tokens. Clusters that
    fail are left to the next run; if any did, this raises after the others are saved."""
    run = RunDir.open(run_dir)
    run.require_stage("cluster", "adag cluster")
    nodes = run.read_table("trace", "nodes")
    prompts = run.read_table("trace", "prompts")
    half = run.read_table("cluster", "half_neurons")
    clusters = run.read_table("cluster", "clusters")
    node_cluster = node_clusters(nodes, half)
    inputs = input_records(nodes, prompts, node_cluster, run.stage_config("trace")["keep_first_position"])
    outputs = output_records(nodes, prompts, node_cluster)
    prompt_text = dict(zip(prompts["prompt"], prompts["text"]))
    wanted = config.clusters if config.clusters is not None else clusters["cluster"].tolist()
    inhibitory = dict(zip(clusters["cluster"], clusters["mean_attribution"] < 0))

    if dry_run:
        return _estimate(config, wanted, inputs, outputs)

    resume = run.begin_stage(STAGE, config.model_dump(mode="json"))
    explainer, simulator = make_llms(config, cache_dir() / "llm-cache.sqlite")
    todo = [c for c in wanted if not (resume and _done(run, c))]

    def work(cluster: int) -> None:
        row = describe_cluster(cluster, inputs.get(cluster, []), outputs.get(cluster, []), prompt_text,
                               bool(inhibitory.get(cluster, False)), explainer, simulator, config)
        run.write_part(STAGE, "descriptions", cluster, pa.Table.from_pylist([row], schema=DESCRIPTIONS))

    bar = tqdm(total=len(todo), unit="cluster", desc="describe", disable=None if progress else True)  # None: a tty
    with ThreadPoolExecutor(config.concurrency) as pool:
        for _ in pool.map(work, todo):
            bar.update()
    bar.close()
    ledger = pd.DataFrame([asdict(e) for e in _ledger(explainer) + (simulator.ledger if simulator is not
                                                                   getattr(explainer, "llm", None) else [])])
    run.write_table(STAGE, "ledger", ledger)
    table = run.read_table(STAGE, "descriptions")
    failed = table[table["status"] != "ok"].sort_values("cluster")
    if len(failed):
        raise AdagError(f"{len(failed)} of {len(table)} clusters failed (cluster {failed['cluster'].iloc[0]}: "
                        f"{failed['failure'].iloc[0]}); rerun the same command to retry them")
    run.finish_stage(STAGE, clusters=len(table), failed=0, calls=int((~ledger["cached"]).sum()) if len(ledger)
                     else 0, cached_calls=int(ledger["cached"].sum()) if len(ledger) else 0)
    return {"clusters": len(table), "failed": 0}


def make_llms(config: DescribeConfig, cache_path) -> tuple[Explainer, CachedBackend]:
    """The explainer and the simulator; one backend (one ledger, one endpoint state) when both are the same."""
    explainer = make_explainer(config.explainer, cache_path, config.temperature, config.request_timeout,
                               config.retries)
    if isinstance(explainer, LLMExplainer) and config.simulator == config.explainer:
        return explainer, explainer.llm
    return explainer, CachedBackend(make_backend(config.simulator, "simulator"), cache_path, config.request_timeout,
                                    config.retries)


def _ledger(explainer: Explainer) -> list:
    return explainer.llm.ledger if isinstance(explainer, LLMExplainer) else []


def _done(run: RunDir, cluster: int) -> bool:
    if not run.has_part(STAGE, "descriptions", cluster):
        return False
    path = run.path / STAGE / "descriptions" / f"part-{cluster:06d}.parquet"
    return pd.read_parquet(path)["status"].iloc[0] == "ok"


def describe_cluster(cluster: int, inputs: list[Record], outputs: list[Record], prompt_text: dict[int, str],
                     inhibitory: bool, explainer: Explainer, simulator: CachedBackend,
                     config: DescribeConfig) -> dict:
    """One cluster's descriptions, within `config.cluster_timeout`; an unusable reply after all attempts,
    a server that is down or the time running out marks the cluster failed."""
    row: dict = dict.fromkeys(DESCRIPTIONS.names) | {"cluster": cluster, "status": "ok"}
    explainer, simulator = explainer.bounded(config.cluster_timeout), simulator.bounded(config.cluster_timeout)
    try:
        shown: dict[str, list] = {"input": [], "output": []}
        for sign, name in ((1, "input"), (-1, "negative_input")):
            excerpts, held_out = input_split(sign_part(inputs, sign), config)
            best = best_description(explainer, simulator, "input", excerpts, held_out,
                                    [r.values for r in held_out], config, f"{cluster}{name}")
            row[f"{name}_description"], row[f"{name}_score"] = best.description or None, best.score
            shown["input"] = shown["input"] or excerpts
        excerpts, held_out, truth = output_split(outputs, prompt_text, config)
        best = best_description(explainer, simulator, "output", excerpts, held_out, truth, config, f"{cluster}output")
        row["output_description"], row["output_score"] = best.description or None, best.score
        shown["output"] = excerpts
        descriptions = {"input": row["input_description"] or "", "output": row["output_description"] or ""}
        label = retry(config.attempts, lambda attempt: explainer.label(descriptions, shown, attempt))
        row["label"] = f"not[{label}]" if inhibitory else label
    except Exception as error:  # noqa: BLE001 - any failure is recorded for this cluster; the run goes on
        row.update(status="failed", failure=f"{type(error).__name__}: {str(error).splitlines()[0][:200]}")
    return row


def input_split(records: list[Record], config: DescribeConfig) -> tuple[list[Excerpt], list[Record]]:
    """Highlighted excerpts for the explainer and held-out records for scoring (none without values)."""
    if not any(r.values.max(initial=0) > 0 for r in records):
        return [], []
    explain, held_out = exemplar_pool(records, config.top_records, config.random_records, config.seed)
    if config.highlight == "quantile":
        threshold = quantile_walk_threshold(explain + held_out, config.highlight_k)
        masks = [(r.values >= threshold) & (r.values > 0) for r in explain]
    else:
        masks = [top_k_mask(r, config.highlight_k) for r in explain]
    return [Excerpt(r.tokens, mask) for r, mask in zip(explain, masks)], held_out


def output_split(records: list[Record], prompt_text: dict[int, str],
                 config: DescribeConfig) -> tuple[list[TargetExcerpt], list[Record], list[np.ndarray]]:
    """The prompts pushed hardest, alternately shown to the explainer and held out, with scores in [-10, 10]."""
    top = sorted(records, key=lambda r: (-float(np.abs(r.values).max(initial=0)), r.prompt))[:config.output_records]
    scores = normalised_scores(top)
    excerpts = [TargetExcerpt(prompt_text[r.prompt], r.tokens, s) for r, s in zip(top[0::2], scores[0::2])]
    return excerpts, top[1::2], scores[1::2]


def best_description(explainer: Explainer, simulator: CachedBackend, kind: Literal["input", "output"],
                     excerpts: list, held_out: list[Record], truth: list[np.ndarray], config: DescribeConfig,
                     seed_key: str) -> Scored:
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
    scored = [Scored(d, simulated_score(simulator, kind, d, held_out, truth, config.attempts) if held_out and d
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
