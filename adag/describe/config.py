"""Describe settings (pydantic only, so that the CLI can build its options without heavy imports); the
explainer and simulator backends are checked for their role (adag.llm.roles) without loading anything."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from adag.llm.roles import checked
from adag.pipeline import Stage
from adag.settings import Seed, Settings

DAY = 86400.0  # seconds: the longest wait for a reply or a cluster (a socket takes no more than this)


class DescribeConfig(Settings):
    explainer: str = Field("stats", description=(
        "who writes descriptions: stats (offline summary of the highlighted tokens, no LLM), local:MODEL, "
        "openai:MODEL, openai:MODEL@URL (a vLLM, Ollama or llama.cpp server) or anthropic:MODEL"))
    simulator: str = Field("embed:minilm", description=(
        "who scores descriptions on held-out records: embed:minilm (offline sentence embeddings), "
        "local:MODEL, openai:MODEL, openai:MODEL@URL or anthropic:MODEL"))
    samples: int = Field(5, ge=1, description="candidate descriptions per explanation (LLM explainers)")
    subset_size: int = Field(15, ge=1, description="excerpts shown to an LLM explainer per candidate")
    top_records: int = Field(80, ge=1, description="strongest records in each cluster's exemplar pool")
    random_records: int = Field(20, ge=0, description="random other records in the pool (negatives)")
    output_records: int = Field(20, ge=2, description="prompts pushed hardest, used for the output description")
    highlight: Literal["quantile", "topk"] = Field("quantile", description=(
        "how tokens are highlighted: quantile walk, or each record's top k"))
    highlight_k: int = Field(1, ge=1, description=(
        "distinct highlighted strings (quantile) or tokens per record (topk); k=1 (as in the paper) ties "
        "k=2 and beats k=3 in benchmarks/describe_eval.py; each excerpt also shows its own top token"))
    temperature: float = Field(1.0, ge=0, le=2, description="sampling temperature of an LLM explainer")
    attempts: int = Field(3, ge=1, description="tries for an unusable LLM reply before the cluster is marked failed")
    clusters: list[int] | None = Field(None, min_length=1, description="comma-separated cluster ids (default: all)")
    seed: Seed = Field(0, description="random seed for exemplar pools and subsets")

    @field_validator("explainer")
    @classmethod
    def _can_explain(cls, spec: str) -> str:
        return checked(spec, "explainer")

    @field_validator("simulator")
    @classmethod
    def _can_simulate(cls, spec: str) -> str:
        return checked(spec, "simulator")


class DescribeOptions(Settings):
    """How this invocation talks to LLM servers; none of it changes what a description would be."""

    dry_run: bool = Field(False, description="count calls and tokens; send nothing, write nothing")
    concurrency: int = Field(4, ge=1, description="clusters described at once")
    request_timeout: float = Field(120.0, gt=0, le=DAY, description="seconds to wait for one LLM reply")
    retries: int = Field(3, ge=0, description=(
        "resends of a request that failed on the server's side (timeout, refused, 429, 5xx) before the "
        "endpoint counts as down and the remaining clusters fail at once"))
    cluster_timeout: float = Field(900.0, gt=0, le=DAY, description=(
        "seconds after which a cluster is given up (marked failed, retried on the next run)"))


DESCRIBE_STAGE = Stage(
    "describe", "Describe each cluster (what makes it fire, what it makes the model say), score and label it.",
    DescribeConfig, "adag.describe.run:describe_run", "adag.describe.run:describe_summary",
    requires=("cluster",), options=DescribeOptions, resumable=True)
