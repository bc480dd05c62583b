"""Settings of the report, export and figure commands (pydantic only, for the CLI)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator
from pydantic_core import PydanticCustomError

from adag.outputs import OutputPath
from adag.pipeline import Stage
from adag.settings import Settings, only_with

DEFAULT_PROMPTS = 50  # prompt graphs a report embeds
DEFAULT_SHARE = 0.8  # of the attribution carried by the neurons drawn (viewer and figures)
DEFAULT_MIN_WEIGHT = 0.1  # |weight| of the edges drawn in figures
REPORT_FORMATS, EXPORT_FORMATS, FIGURE_FORMATS = (".html", ".htm"), (".json",), (".svg", ".png", ".pdf")
DEFAULT_EDGE_SHARE = 0.5  # the viewer first draws edges into a node with |weight| at least this share of its largest
TARGET_INPUTS = (3, 1)  # a drawn target logit always shows this many of its strongest positive and negative inputs
MAX_MULTIPLIER = 100.0  # |multiplier| at most, when steering from the viewer


class ReportConfig(Settings):
    """Which prompts' attribution graphs a report embeds (the cluster views are always in it)."""

    prompts: int | None = Field(None, ge=0, description="embed the attribution graphs of this many prompts, those "
                                f"with the largest total |attribution| (default {DEFAULT_PROMPTS})")
    prompt_ids: list[int] | None = Field(None, description="embed the graphs of these prompt ids instead")

    @model_validator(mode="after")
    def _one_choice(self) -> ReportConfig:
        if self.prompts is not None and self.prompt_ids is not None:
            raise PydanticCustomError("choice", "give --prompts or --prompt-ids, not both")
        return self

    @property
    def prompt_count(self) -> int:
        return DEFAULT_PROMPTS if self.prompts is None else self.prompts


class ReportOptions(Settings):
    out: Annotated[str | None, OutputPath(REPORT_FORMATS)] = Field(
        None, description="write the file (.html) here instead of RUN/report/report.html")


class ExportConfig(Settings):
    """Export has no settings beyond its options."""


class ExportOptions(Settings):
    prompt: int = Field(ge=0, description="prompt id")
    out: Annotated[str, OutputPath(EXPORT_FORMATS)] = Field(description="output .json file")


class FigureConfig(Settings):
    """What `adag figure` draws."""

    prompt: int | None = Field(None, ge=0, description="prompt id whose attribution graph to draw")
    clusters: bool = Field(False, description="draw the dataset cluster graph instead of a prompt's graph")
    supernodes: bool = Field(False, description="collapse each cluster of the prompt into one supernode")
    share: float = Field(DEFAULT_SHARE, gt=0, le=1, description="draw the neurons that together carry this "
                                                                "share of the attribution")
    min_weight: float = Field(DEFAULT_MIN_WEIGHT, ge=0, description="draw only edges with |weight| at least this")
    color_by: Literal["sign", "cluster"] = Field("sign", description="colour nodes by the sign of their "
                                                                     "attribution or by cluster")

    @model_validator(mode="after")
    def _one_graph(self) -> FigureConfig:
        if self.clusters == (self.prompt is not None):
            raise PydanticCustomError("choice", "give either --prompt ID (a prompt's attribution graph) or --clusters "
                                      "(the cluster graph)")
        only_with(self, not self.clusters, "--prompt", ("supernodes", "share", "min_weight", "color_by"))
        return self


class FigureOptions(Settings):
    out: Annotated[str, OutputPath(FIGURE_FORMATS)] = Field(description="output file: .svg, .png or .pdf")


REPORT_STAGE = Stage(
    "report", "Write the viewer with its data (cluster views, the attribution graphs of the prompts carrying the "
    "most attribution) as one self-contained HTML file.",
    ReportConfig, "adag.report.html:report_run", "adag.report.html:report_summary",
    requires=("cluster",), uses=("describe", "measure", "correlate", "steer"), options=ReportOptions)
# Commands that write a file outside the run (writes=False): not steps of a study.
EXPORT_STAGE = Stage(
    "export", "Export one prompt's graph as Neuronpedia / circuit-tracer graph JSON.",
    ExportConfig, "adag.report.export:export_run", "adag.report.export:export_summary",
    requires=("trace",), uses=("cluster", "describe"), options=ExportOptions, writes=False)
FIGURE_STAGE = Stage(
    "figure", "Draw a prompt's attribution graph (or with --clusters the cluster graph) as a static picture for "
    "papers: .svg, .png or .pdf.",
    FigureConfig, "adag.report.figure:figure_run", "adag.report.figure:figure_summary",
    requires=("trace",), uses=("cluster", "describe"), options=FigureOptions, writes=False)
