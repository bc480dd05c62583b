"""Tracing settings; defaults are the published reference settings (DESIGN.md sections 3-6).

Light on purpose (pydantic only): the CLI builds its options from these models at start-up.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class TraceConfig(BaseModel):
    """Settings that shape the traced tables; recorded in the run's manifest."""

    model_config = ConfigDict(extra="forbid")

    metric: Literal["topk", "labels", "logit_diff"] = Field(
        "topk", description="what the graph explains: the top-k next tokens, the rows' labels, or the "
        "difference of the first two labels' logits")
    k: int = Field(5, ge=1, description="number of top next tokens in the topk metric")
    selection: Literal["threshold", "topk"] = Field(
        "threshold", description="keep nodes by relative score (--threshold) or the top --top-nodes")
    threshold: float = Field(0.005, gt=0, allow_inf_nan=False,
                             description="keep a node when |RelP| >= threshold * |m|")
    top_nodes: int = Field(200, ge=1, description="nodes kept per prompt (or in all) with --selection topk")
    aggregation: Literal["none", "any", "mean"] = Field(
        "any", description="none: select per prompt; any/mean: select (layer, position from the end, neuron) "
        "keys by their max/mean score over the dataset and keep them in every prompt")
    keep_first_position: bool = Field(False, description="allow nodes at the first position (an attention sink)")
    blacklist: list[tuple[int, int, int]] = Field(
        default_factory=list, description="(layer, neuron, polarity) half-neurons never kept",
        json_schema_extra={"cli": False})
    rules: Literal["half", "no_half", "plain"] = Field(
        "half", description="linearisation rules of the backward pass")
    profiles: Literal["total", "direct"] = Field("total", description="total or direct effects in profiles")
    edges: bool = Field(True, description="compute edges between nodes (the edge pass)")
    edge_threshold: float = Field(0.01, ge=0, allow_inf_nan=False, description="drop edges with |w| below this")
    batch_size: int = Field(4, ge=1, description="prompts per batch (one part of the tables per batch)")
    chunk_size: int = Field(64, ge=1, description="nodes per batched vector-Jacobian product (bounds memory)")


class TraceInputs(BaseModel):
    """What to trace and where: the run's identity, not recorded as settings."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="built-in name, local model directory or hub id (org/name)")
    dataset: str = Field(description="built-in dataset name or a .jsonl/.csv file")
    out: str = Field(description="run directory to create (or resume)")
    limit: int | None = Field(None, ge=1, description="trace only the first N prompts")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="weights' dtype")
    device: str = Field("cpu", description="cpu, cuda, cuda:N or auto (spread over GPUs)")
