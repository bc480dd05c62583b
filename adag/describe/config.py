"""Describe settings (pydantic only, so that the CLI can build its options without heavy imports), and
the names of explainer and simulator backends, checked for their role without loading anything."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

Role = Literal["explainer", "simulator"]
# Kinds that can play each role. `stats` is the offline explainer (adag.describe.explain), not an LLM.
ROLES: dict[str, tuple[str, ...]] = {"explainer": ("stats", "local", "openai", "anthropic"),
                                     "simulator": ("embed", "local", "openai", "anthropic")}
SPELLING = {"stats": "stats", "embed": "embed[:minilm]", "local": "local[:MODEL]", "openai": "openai:MODEL[@URL]",
            "anthropic": "anthropic:MODEL[@URL]"}


@dataclass(frozen=True)
class BackendSpec:
    kind: str
    model: str
    base_url: str | None = None


def parse_spec(spec: str, role: Role) -> BackendSpec:
    """Check `KIND[:MODEL][@URL]` for a role; a ValueError says what to write instead."""
    kind, _, rest = spec.partition(":")
    model, _, base_url = rest.partition("@")
    if kind == "embed" and role == "explainer":
        raise ValueError(f"'{spec}' cannot be the explainer: an embedding model scores descriptions but cannot "
                         "write them; use stats (offline), local:MODEL, openai:MODEL[@URL] or anthropic:MODEL")
    if kind == "stats" and role == "simulator":
        raise ValueError("'stats' writes descriptions but cannot score them; use embed:minilm (offline), "
                         "local:MODEL, openai:MODEL[@URL] or anthropic:MODEL as the simulator")
    if kind not in ROLES[role]:
        raise ValueError(f"unknown backend '{spec}'; as {role} use " + ", ".join(SPELLING[k] for k in ROLES[role]))
    if kind in ("openai", "anthropic") and not model:
        raise ValueError(f"'{spec}' names no model; use {kind}:MODEL, e.g. openai:gpt-4o-mini")
    if base_url and kind not in ("openai", "anthropic"):
        raise ValueError(f"'{spec}': only openai: and anthropic: backends take an @URL")
    default = {"local": "smollm2-135m", "embed": "minilm"}.get(kind, "")
    return BackendSpec(kind, model or default, base_url or None)


def _checked(spec: str, role: Role) -> str:
    try:
        parse_spec(spec, role)
    except ValueError as error:
        raise PydanticCustomError("backend", str(error).replace("{", "{{").replace("}", "}}")) from None
    return spec


class DescribeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

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
    temperature: float = Field(1.0, ge=0, description="sampling temperature of an LLM explainer")
    attempts: int = Field(3, ge=1, description="tries for an unusable LLM reply before the cluster is marked failed")
    clusters: list[int] | None = Field(None, description="comma-separated cluster ids (default: all)")
    seed: int = Field(0, description="random seed for exemplar pools and subsets")

    @field_validator("explainer")
    @classmethod
    def _can_explain(cls, spec: str) -> str:
        return _checked(spec, "explainer")

    @field_validator("simulator")
    @classmethod
    def _can_simulate(cls, spec: str) -> str:
        return _checked(spec, "simulator")


class DescribeOptions(BaseModel):
    """How this invocation talks to LLM servers; none of it changes what a description would be."""

    model_config = ConfigDict(extra="forbid")

    dry_run: bool = Field(False, description="count calls and tokens; send nothing, write nothing")
    concurrency: int = Field(4, ge=1, description="clusters described at once")
    request_timeout: float = Field(120.0, gt=0, description="seconds to wait for one LLM reply")
    retries: int = Field(3, ge=0, description=(
        "resends of a request that failed on the server's side (timeout, refused, 429, 5xx) before the "
        "endpoint counts as down and the remaining clusters fail at once"))
    cluster_timeout: float = Field(900.0, gt=0, description=(
        "seconds after which a cluster is given up (marked failed, retried on the next run)"))
