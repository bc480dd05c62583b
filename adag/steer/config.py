"""Settings of the steering stages (pydantic only, so that the CLI can build its options quickly)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field


class SteerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    clusters: list[int] | None = Field(None, description="comma-separated clusters (default: sweep all)")
    multipliers: list[float] = Field([0.0, 1.0, 2.0], min_length=1,
                                     description="comma-separated multipliers (0 ablates, 2 amplifies)")
    positions: Literal["all", "traced"] = Field("all", description="steer at all positions, or only where the "
                                                "cluster's members were traced")
    controls: int = Field(0, ge=0, description="random same-size, same-layer sets per cluster (ablation)")
    batch_size: int = Field(8, ge=1, description="prompts per forward pass")
    seed: int = Field(0, description="random seed of the controls")


class FaithfulnessConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    fractions: list[Annotated[float, Field(ge=0, le=1)]] = Field([0.01, 0.05, 0.1, 0.2, 0.5, 1.0], min_length=1,
                                   description="comma-separated fractions of traced nodes kept (0..1)")
    ablation: Literal["zero", "mean"] = Field("zero", description="what the other neurons are set to")
    batch_size: int = Field(8, ge=1, description="prompts per forward pass")


class CorrelateConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    field: str = Field(description="a numeric metadata field of the dataset rows")


class JudgeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    cluster: int = Field(description="cluster to steer")
    question: str = Field(min_length=1, description="yes/no question the judge answers about each generation")
    judge: str = Field("local:smollm2-135m", description="backend of the judge, KIND:MODEL[@URL]")
    multipliers: list[float] = Field([0.0, 1.0, 2.0], min_length=1, description="comma-separated multipliers")
    samples: int = Field(4, ge=1, description="generations per prompt and setting")
    max_new_tokens: int = Field(40, ge=1, description="length of each generation")
    coherence: bool = Field(False, description="also ask whether each generation is coherent")
    seed: int = Field(0, description="sampling seed")


class ModelOption(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="model spec if not the run's own (same weights required)")
