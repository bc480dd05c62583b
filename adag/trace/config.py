"""Tracing settings; defaults are the published reference settings (DESIGN.md sections 3-6)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# Prompts per batch when not given, by device type. On CPU a batch of one is fastest: padding and
# larger working sets cost more than batching saves (benchmarks/trace_bench.py, README "Benchmarks").
# On a GPU, batching fills the device.
DEFAULT_BATCH_SIZE = {"cpu": 1, "cuda": 8}


class TraceConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    metric: Literal["topk", "labels", "logit_diff"] = Field(
        "topk", description="topk: the model's own top next tokens; labels: the given labels, summed; "
        "logit_diff: first label minus second")
    n_targets: int = Field(5, ge=1, description="number of top next tokens summed in the topk metric")
    selection: Literal["threshold", "topk"] = Field(
        "threshold", description="keep nodes by threshold, or the top-nodes highest-scoring per prompt")
    threshold: float = Field(0.005, gt=0, description="keep a neuron or embedding node v when "
                             "|RelP_v| >= threshold * |m|")
    top_nodes: int = Field(200, ge=1, description="nodes kept per prompt (or in all) with selection=topk")
    aggregation: Literal["none", "any", "mean"] = Field(
        "any", description="none: select per prompt; any/mean: select (layer, position from the end, neuron) "
        "keys by their max/mean score over the dataset and keep them in every prompt (meant for prompts "
        "built from one template)")
    keep_first_position: bool = Field(False, description="allow nodes at each prompt's first position "
                                      "(an attention sink)")
    blacklist: list[tuple[int, int, int]] = Field(default_factory=list, description="(layer, neuron, polarity) "
                                                  "half-neurons never kept")
    rules: Literal["half", "no_half", "plain"] = Field(
        "half", description="gradient rules: half (RelP with the half rule), no_half, or plain gradients")
    profiles: Literal["total", "direct"] = Field(
        "total", description="total: profiles, attributions and embedding relevance in the linearised model; "
        "direct: all of them with every MLP output held constant")
    input_profiles: Literal["auto", "forward", "vjp"] = Field(
        "auto", description="how input profiles are computed: forward (one tangent forward per source "
        "position), vjp (one backward row per kept node) or auto (the cheaper one, per batch); "
        "forward needs rules=half")
    edges: bool = Field(True, description="compute direct edges (a second, cut forward pass)")
    edge_threshold: float = Field(0.01, ge=0, description="drop edges with |w| below this")
    batch_size: int | None = Field(None, ge=1, description="prompts per batch; default: per device, "
                                   "from measurements (see DEFAULT_BATCH_SIZE)")
    chunk_size: int | None = Field(None, ge=1, description="rows per batched pass (vector-Jacobian "
                                   "products or tangent rows); default: as many as fit the working memory")

    def for_device(self, device_type: str) -> TraceConfig:
        """This config with the batch size resolved for a device type ("cpu", "cuda", ...)."""
        if self.batch_size is not None:
            return self
        return self.model_copy(update={"batch_size": DEFAULT_BATCH_SIZE.get(device_type, 1)})

    @model_validator(mode="after")
    def _forward_mode_needs_half_rule(self) -> TraceConfig:
        if self.input_profiles == "forward" and self.rules != "half":
            raise ValueError("input_profiles=forward needs rules=half (use vjp or auto with other rules)")
        return self
