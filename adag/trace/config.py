"""Tracing settings; defaults are the published reference settings (DESIGN.md sections 3-6).

Light on purpose (pydantic only): the CLI builds its options from these models at start-up.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from adag.datasets import DEFAULT_BASE_TEMPLATE, check_base_template
from adag.outputs import OutputPath
from adag.pipeline import Stage
from adag.settings import Settings, only_with

# Prompts per batch when not given, by device type: the batch size with the least time per prompt
# that `benchmarks/trace_bench.py --batch-sizes 1,2,4` measures on that device type (it prints its
# choice). CPU: 1, the fastest that keeps per-prompt selection (a larger batch pools node keys over its
# prompts: other tables; docs/benchmarks.md has the figures). GPU: 8, not measured yet.
DEFAULT_BATCH_SIZE = {"cpu": 1, "cuda": 8}

# The working-memory budget when not given, in MiB, by device type: what one batched pass (VJP rows,
# tangent rows, the logit VJPs' gradients) may hold beyond the weights and one linearised forward
# pass. On a GPU (no entry) it is half of the memory free when the pass starts.
DEFAULT_WORKING_MEMORY_MIB = {"cpu": 512}


class TraceConfig(Settings):
    """Settings that shape the traced tables; recorded in the run's manifest."""

    metric: Literal["topk", "labels", "logit_diff"] = Field(
        "topk", description="what the graph explains: the top --n-targets next tokens, the rows' labels, or "
        "the difference of the first two labels' logits")
    n_targets: int = Field(5, ge=1, description="number of top next tokens summed in the topk metric")
    selection: Literal["threshold", "topk"] = Field(
        "threshold", description="keep nodes by relative score (--threshold) or the top --top-nodes")
    threshold: float = Field(0.005, gt=0, description="keep a neuron or embedding node "
                             "when |RelP| >= threshold * |m|")
    top_nodes: int = Field(200, ge=1, description="nodes kept per prompt (or in all) with --selection topk")
    aggregation: Literal["none", "any", "mean"] = Field(
        "any", description="none: keep nodes per prompt; any/mean: pool the scores of (layer, position from the "
        "end, neuron) keys over the prompts of --aggregate-over by their max/mean and keep each passing key in "
        "every one of those prompts (meant for prompts built from one template)")
    aggregate_over: Literal["batch", "dataset"] = Field(
        "batch", description="the prompts --aggregation any|mean pools: those of one batch (the reference; nodes "
        "per prompt bounded by --batch-size) or the whole dataset (nodes per prompt grow with the dataset)")
    keep_first_position: bool = Field(False, description="allow nodes at each prompt's first position "
                                      "(an attention sink)")
    blacklist: list[tuple[int, int, int]] = Field(
        default_factory=list, description="(layer, neuron, polarity) half-neurons never kept",
        json_schema_extra={"cli": False})
    rules: Literal["half", "no_half", "plain"] = Field(
        "half", description="gradient rules: half (RelP with the half rule), no_half, or plain gradients")
    profiles: Literal["total", "direct"] = Field(
        "total", description="total: profiles, attributions and embedding relevance in the linearised model; "
        "direct: all of them with every MLP output held constant")
    input_profiles: Literal["auto", "forward", "vjp"] = Field(
        "auto", description="how input profiles are computed: forward (one tangent forward per source "
        "position), vjp (one backward row per kept node) or auto (the cheaper one, per batch); "
        "forward needs --rules half")
    edges: bool = Field(True, description="compute direct edges (effects with every MLP output held)")
    edge_threshold: float = Field(0.01, ge=0, description="drop edges with |w| below this")
    batch_size: int | None = Field(None, ge=1, description="prompts per batch (one part of the tables per batch); "
                                   "default by device: " + ", ".join(f"{device} {size}" for device, size in
                                                                    DEFAULT_BATCH_SIZE.items()))
    working_memory_mib: int | None = Field(
        None, ge=1, description="MiB that one batched pass may hold for its rows (vector-Jacobian products, "
        "tangent rows); default by device: "
        + ", ".join(f"{device} {mib}" for device, mib in DEFAULT_WORKING_MEMORY_MIB.items())
        + ", GPU half of the free memory")
    chunk_size: int | None = Field(None, ge=1, description="rows per batched pass, overriding the working-memory "
                                   "budget (for tests); default: as many rows as fit --working-memory-mib")

    prompt_format: Literal["auto", "chat", "plain"] = Field(
        "auto", description="how a row becomes text: chat (the tokenizer's chat template, then the seed response), "
        "plain (--base-template) or auto (chat when the model has a chat template, plain for base models)")
    base_template: str = Field(DEFAULT_BASE_TEMPLATE, description="a row's text under the plain format, with "
                               "{prompt} and {seed_response} filled in (e.g. 'Q: {prompt}\\nA:')")

    @field_validator("base_template")
    @classmethod
    def _valid_template(cls, value: str) -> str:
        return check_base_template(value)

    def for_device(self, device_type: str) -> TraceConfig:
        """This config with the batch size resolved for a device type ("cpu", "cuda", ...)."""
        if self.batch_size is not None:
            return self
        return self.model_copy(update={"batch_size": DEFAULT_BATCH_SIZE.get(device_type, 1)})

    @model_validator(mode="after")
    def _forward_mode_needs_half_rule(self) -> TraceConfig:
        if self.input_profiles == "forward" and self.rules != "half":
            raise ValueError("--input-profiles forward needs --rules half (use vjp or auto with other rules)")
        only_with(self, self.aggregation != "none", "--aggregation any|mean", ("aggregate_over",))
        return self


class TraceInputs(Settings):
    """What to trace and where: the run's identity, not recorded as settings."""

    model: str | None = Field(None, description="built-in name, local model directory or hub id (org/name); "
                              "required unless --finish")
    dataset: str | None = Field(None, description="built-in dataset name or a .jsonl/.csv file; required unless "
                                "--finish")
    out: Annotated[str | None, OutputPath(run=True)] = Field(
        None, description="run directory to create (or resume); required unless --finish")
    limit: int | None = Field(None, ge=1, description="trace only the first N prompts")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="weights' dtype")
    device: str = Field("cpu", description="cpu, cuda, cuda:N or auto (spread over GPUs); under torchrun, cuda "
                        "means cuda:LOCAL_RANK")
    shard: str | None = Field(None, description="I/N: trace only batches I, I+N, I+2N, ... (e.g. one task of a job "
                              "array, all with the same --out); the last shard to finish commits the run")
    finish: str | None = Field(None, description="commit the run directory FINISH once all its shards are done "
                               "(given alone)")


TRACE_STAGE = Stage(
    "trace", "Trace attribution graphs, profiles and edges for every prompt of a dataset.",
    TraceConfig, "adag.trace.run:trace_run", "adag.trace.run:trace_summary",
    options=TraceInputs, resumable=True, run_dir_option="out", model=True)
