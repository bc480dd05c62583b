"""Tracing settings; defaults are the published reference settings (DESIGN.md sections 3-6)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class TraceConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    metric: Literal["topk", "labels", "logit_diff"] = "topk"
    k: int = Field(5, ge=1, description="number of top next tokens in the topk metric")
    selection: Literal["threshold", "topk"] = "threshold"
    threshold: float = Field(0.005, gt=0, description="keep v when |RelP_v| >= threshold * |m|")
    top_nodes: int = Field(200, ge=1, description="nodes kept per prompt (or in all) with selection=topk")
    aggregation: Literal["none", "any", "mean"] = Field(
        "any", description="none: select per prompt; any/mean: select (layer, position from the end, neuron) "
        "keys by their max/mean score over the dataset and keep them in every prompt")
    keep_first_position: bool = False
    blacklist: list[tuple[int, int, int]] = Field(default_factory=list, description="(layer, neuron, polarity)")
    rules: Literal["half", "no_half", "plain"] = "half"
    profiles: Literal["total", "direct"] = "total"
    edges: bool = True
    edge_threshold: float = Field(0.01, ge=0)
    batch_size: int = Field(4, ge=1)
    chunk_size: int = Field(64, ge=1, description="nodes per batched vector-Jacobian product (bounds memory)")
