"""Options of the report and export commands (pydantic only, for the CLI)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class ReportConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ReportOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    out: str | None = Field(None, description="write the file here instead of RUN/report/report.html")


class ExportOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: int = Field(ge=0, description="prompt id")
    out: str = Field(description="output .json file")
