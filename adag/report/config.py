"""Settings of the report, export and figure commands (pydantic only, for the CLI)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

DEFAULT_SHARE = 0.8  # of the attribution carried by the neurons drawn (viewer and figures)
DEFAULT_MIN_WEIGHT = 0.1  # |weight| of the edges drawn in figures
DEFAULT_EDGE_SHARE = 0.05  # the viewer first draws edges with |weight| at least this share of the graph's largest


class ReportConfig(BaseModel):
    """Which prompts' attribution graphs a report embeds (the cluster views are always in it)."""

    model_config = ConfigDict(extra="forbid")

    prompts: int = Field(50, ge=0, description="embed the attribution graphs of this many prompts, those with "
                                               "the largest total |attribution|")
    prompt_ids: list[int] | None = Field(None, description="embed the graphs of these prompt ids instead")


class ReportOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    out: str | None = Field(None, description="write the file here instead of RUN/report/report.html")


class ExportConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ExportOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: int = Field(ge=0, description="prompt id")
    out: str = Field(description="output .json file")


class FigureConfig(BaseModel):
    """What `adag figure` draws."""

    model_config = ConfigDict(extra="forbid")

    prompt: int | None = Field(None, ge=0, description="prompt id whose attribution graph to draw")
    clusters: bool = Field(False, description="draw the dataset cluster graph instead of a prompt's graph")
    supernodes: bool = Field(False, description="collapse each cluster of the prompt into one supernode")
    share: float = Field(DEFAULT_SHARE, gt=0, le=1, description="draw the neurons that together carry this "
                                                                "share of the attribution")
    min_weight: float = Field(DEFAULT_MIN_WEIGHT, ge=0, description="draw only edges with |weight| at least this")
    color_by: Literal["sign", "cluster"] = Field("sign", description="colour nodes by the sign of their "
                                                                     "attribution or by cluster")


class FigureOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    out: str = Field(description="output file: .svg, .png or .pdf")
