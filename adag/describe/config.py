"""Describe settings (pydantic only, so that the CLI can build its options without heavy imports)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class DescribeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    explainer: str = Field("local:smollm2-135m", description="backend that writes descriptions, KIND:MODEL[@URL]: "
                           "openai:..., anthropic:..., local:...")
    simulator: str = Field("embed:minilm", description="backend that scores descriptions (embed:minilm is an "
                           "offline sentence-embedding simulator)")
    samples: int = Field(5, ge=1, description="candidate descriptions per explanation")
    subset_size: int = Field(15, ge=1, description="excerpts shown to the explainer per candidate")
    top_records: int = Field(80, ge=1, description="strongest records in each cluster's exemplar pool")
    random_records: int = Field(20, ge=0, description="random other records in the pool (negatives)")
    output_records: int = Field(20, ge=1, description="records used for the output description")
    highlight: Literal["quantile", "topk"] = Field("quantile", description="quantile walk or top-k highlighting")
    highlight_k: int = Field(1, ge=1, description="distinct highlighted strings (quantile) or tokens (topk)")
    temperature: float = Field(1.0, ge=0, description="explainer sampling temperature")
    attempts: int = Field(3, ge=1, description="tries per LLM request before the cluster is marked failed")
    concurrency: int = Field(4, ge=1, description="clusters described at once")
    clusters: list[int] | None = Field(None, description="comma-separated cluster ids (default: all)")
    seed: int = Field(0, description="random seed for exemplar pools and subsets")


class DescribeOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dry_run: bool = Field(False, description="count calls and tokens; send nothing, write nothing")
