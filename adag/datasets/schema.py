"""What a prompt row is: its fields, and the checks every row passes however it was read."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from adag.errors import MAX_JSON_DEPTH, has_visible, json_depth, text_problem

ROW_FIELDS = ("prompt", "seed_response", "labels")


class PromptRow(BaseModel):
    """One prompt; `labels` are single-token answers for the label metrics."""

    model_config = ConfigDict(extra="forbid")

    prompt: str
    seed_response: str = ""
    labels: list[str] = Field(default_factory=list)
    metadata: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _text_and_shape(cls, data: Any) -> Any:
        """Every string is text a tokenizer and a Parquet file can take; metadata is not nested without end.
        Checked before pydantic walks the row, so that no value reaches it that it cannot handle."""
        if isinstance(data, dict):
            if json_depth(data) > MAX_JSON_DEPTH:
                raise ValueError(f"the row is nested more than {MAX_JSON_DEPTH} levels deep; flatten its metadata")
            for where, text in _strings(data):
                if problem := text_problem(text):
                    raise ValueError(f"{where} {problem}")
        return data

    @field_validator("prompt")
    @classmethod
    def _not_empty(cls, value: str) -> str:
        if not has_visible(value):
            raise ValueError("prompt is empty (only whitespace or invisible characters such as zero-width spaces "
                             "or direction marks); give it visible text")
        return value

    @field_validator("metadata")
    @classmethod
    def _finite_numbers(cls, value: dict[str, Any]) -> dict[str, Any]:
        """NaN and infinities would poison every statistic computed from metadata (correlate, measure)."""
        for key, item in value.items():
            if not _all_finite(item):
                raise ValueError(f"metadata '{key}' holds {item!r}, not a finite number; use null for a missing value")
        return value


def _strings(value: Any, where: str = "the row") -> list[tuple[str, str]]:
    """Every string in a row (keys too), with where it is; the row's depth is bounded before this is called."""
    if isinstance(value, str):
        return [(where, value)]
    if isinstance(value, dict):
        return [found for key, item in value.items() for found in
                [*_strings(key, f"a key of {where}"), *_strings(item, f"'{key}'" if where == "the row" else where)]]
    if isinstance(value, list | tuple):
        return [found for item in value for found in _strings(item, where)]
    return []


def _all_finite(value: Any) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(_all_finite(item) for item in value.values())
    if isinstance(value, list):
        return all(_all_finite(item) for item in value)
    return True


@dataclass
class Dataset:
    name: str
    rows: list[PromptRow]

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def sha256(self) -> str:
        payload = json.dumps([row.model_dump() for row in self.rows], sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]
