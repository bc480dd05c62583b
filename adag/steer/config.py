"""Settings of the steering stages (pydantic only, so that the CLI can build its options quickly)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AliasChoices, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from adag.llm.roles import checked
from adag.pipeline import Stage
from adag.settings import Multiplier, Seed, Settings, only_with

ControlKind = Literal["traced", "layer"]


class SteerConfig(Settings):
    clusters: list[int] | None = Field(None, min_length=1, description="comma-separated clusters (default: sweep "
                                       "all, or --top)")
    top: int | None = Field(None, ge=1, description="steer the N clusters whose attribution correlates most "
                            "strongly with the measure (|r| from the correlate stage) instead of --clusters")
    multipliers: list[Multiplier] = Field([0.0, 1.0, 2.0], min_length=1,
                                     description="comma-separated multipliers (0 ablates, 2 amplifies)")
    positions: Literal["all", "traced"] = Field("all", description="steer at all positions, or only where the "
                                                "cluster's members were traced (its controls at the same positions)")
    controls: int = Field(0, ge=0, description="random same-size sets per cluster and control kind, each steered "
                          "by every multiplier; the cluster's change is ranked among theirs (a percentile)")
    control_kinds: list[ControlKind] = Field(
        ["traced"], min_length=1, description="traced: other traced half-neurons of the same layers and "
        "|attribution| quantile bins (does the grouping matter beyond importance?); layer: any neurons of the "
        "same layers")
    control_bins: int = Field(4, ge=1, description="|attribution| quantile bins per layer that traced controls "
                              "are matched on")
    batch_size: int = Field(8, ge=1, description="prompts per forward pass")
    seed: Seed = Field(0, description="random seed of the controls")

    @model_validator(mode="after")
    def _one_choice(self) -> SteerConfig:
        if self.clusters is not None and self.top is not None:
            raise PydanticCustomError("choice", "give --clusters or --top, not both")
        only_with(self, self.controls > 0, "--controls N", ("control_kinds", "control_bins"))
        return self

    def needs(self) -> tuple[str, ...]:
        return ("correlate",) if self.top is not None else ()


class FaithfulnessConfig(Settings):
    fractions: list[Annotated[float, Field(ge=0, le=1)]] = Field([0.01, 0.05, 0.1, 0.2, 0.5, 1.0], min_length=1,
                                   description="comma-separated fractions of traced nodes kept (0..1)")
    ablation: Literal["zero", "mean"] = Field("zero", description="what the other neurons are set to")
    batch_size: int = Field(8, ge=1, description="prompts per forward pass")


class CorrelateConfig(Settings):
    field: str = Field("measure", min_length=1, description="the per-prompt value: 'measure' (the measure "
                       "stage's values) or a numeric metadata field of the dataset rows")
    method: Literal["pearson", "spearman"] = Field("pearson", description="the correlation that orders the "
                                                   "table, decides significance and picks steer --top clusters")
    alpha: float = Field(0.05, gt=0, lt=1, description="false discovery rate: a cluster is significant when its "
                         "Benjamini-Hochberg adjusted p-value is below this")

    def needs(self) -> tuple[str, ...]:
        return ("measure",) if self.field == "measure" else ()


class Judged(Settings):
    """How generations are sampled and judged (shared by the judge measure and the judge stage)."""

    question: str | None = Field(None, min_length=1, description="yes/no question the judge answers about "
                                 "each generation")
    judge: str = Field("local:smollm2-135m", description="backend of the judge: local:MODEL, openai:MODEL, "
                       "openai:MODEL@URL or anthropic:MODEL")
    samples: int = Field(4, ge=1, description="generations per prompt and setting")
    max_new_tokens: int = Field(40, ge=1, description="length of each generation")
    seed: Seed = Field(0, description="sampling seed")

    @field_validator("judge")
    @classmethod
    def _can_judge(cls, spec: str) -> str:
        return checked(spec, "judge")


class MeasureConfig(Judged):
    # "metric" is the trace's m(x); runs and study files written before the measure had its own name say metric.
    measure: Literal["p_correct", "logit_diff", "p_top", "judge"] = Field(
        "p_correct", validation_alias=AliasChoices("measure", "metric"), description="per prompt: the "
        "probability of the first label (the correct answer) at the last position, the first label's logit minus "
        "the second's, the probability of the model's own top answer (the first traced target), or the judge's "
        "yes-rate over sampled generations (--question)")
    batch_size: int = Field(8, ge=1, description="prompts per forward pass")

    @model_validator(mode="after")
    def _judge_needs_question(self) -> MeasureConfig:
        if self.measure == "judge" and not self.question:
            raise PydanticCustomError("question", "the judge measure needs --question, e.g. 'Does the text give "
                                      "harmful advice?'")
        return self


class JudgeConfig(Judged):
    cluster: int = Field(description="cluster to steer")
    question: str = Field(min_length=1, description="yes/no question the judge answers about each generation")
    multipliers: list[Multiplier] = Field([0.0, 1.0, 2.0], min_length=1, description="comma-separated multipliers")
    coherence: bool = Field(False, description="also ask whether each generation is coherent")


class ModelOption(Settings):
    model: str | None = Field(None, description="model spec if not the run's own (same weights required)")


MEASURE_STAGE = Stage(
    "measure", "Measure each prompt's behaviour: P(correct answer), a logit difference, or a judge's yes-rate on "
    "sampled generations.",
    MeasureConfig, "adag.steer.measure:measure_run", "adag.steer.measure:measure_summary",
    requires=("trace",), options=ModelOption, model=True)
CORRELATE_STAGE = Stage(
    "correlate", "Correlate each cluster's per-prompt attribution with the measure or a numeric metadata field "
    "(Benjamini-Hochberg adjusted).",
    CorrelateConfig, "adag.steer.correlate:correlate_run", "adag.steer.correlate:correlate_summary",
    requires=("cluster",))
STEER_STAGE = Stage(
    "steer", "Scale clusters' half-neurons and measure the answer (the measure, probabilities, logit changes, KL, "
    "top tokens) against random controls.",
    SteerConfig, "adag.steer.run:steer_run", "adag.steer.run:steer_summary",
    requires=("cluster",), uses=("measure",), options=ModelOption, model=True)
FAITHFULNESS_STAGE = Stage(
    "faithfulness", "Faithfulness and completeness of node circuits (top nodes kept, the rest ablated).",
    FaithfulnessConfig, "adag.steer.run:faithfulness_run", "adag.steer.run:faithfulness_summary",
    requires=("trace",), options=ModelOption, model=True)
JUDGE_STAGE = Stage(
    "judge", "Generate under steering and have a judge LLM answer a yes/no question; rate = yes / (yes + no).",
    JudgeConfig, "adag.steer.judge:judge_run", "adag.steer.judge:judge_summary",
    requires=("cluster",), options=ModelOption, model=True)
