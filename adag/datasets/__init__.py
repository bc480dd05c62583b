"""Prompt datasets: built-ins, JSONL and CSV files, and how rows become token ids."""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from adag.datasets.builtin import BUILTIN_DATASETS
from adag.errors import AdagError


class PromptRow(BaseModel):
    """One prompt; `labels` are single-token answers for the label metrics."""

    model_config = ConfigDict(extra="forbid")

    prompt: str
    seed_response: str = ""
    labels: list[str] = Field(default_factory=list)
    metadata: dict[str, Any] = Field(default_factory=dict)

    @field_validator("prompt")
    @classmethod
    def _not_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("prompt is empty")
        return value


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


def load_dataset(name_or_path: str, limit: int | None = None) -> Dataset:
    """A built-in dataset by name, or a .jsonl / .csv file."""
    if name_or_path in BUILTIN_DATASETS:
        make, _ = BUILTIN_DATASETS[name_or_path]
        rows = [PromptRow(**raw) for raw in make()]
    else:
        path = Path(name_or_path)
        if not path.is_file():
            raise AdagError(
                f"unknown dataset '{name_or_path}': use a built-in ({', '.join(BUILTIN_DATASETS)}) "
                "or a path to a .jsonl or .csv file"
            )
        rows = _read_file(path)
    if not rows:
        raise AdagError(f"dataset '{name_or_path}' has no rows")
    return Dataset(name_or_path, rows[:limit] if limit else rows)


def _read_file(path: Path) -> list[PromptRow]:
    if path.suffix == ".jsonl":
        records = _jsonl_records(path)
    elif path.suffix == ".csv":
        records = _csv_records(path)
    else:
        raise AdagError(f"{path}: unsupported file type '{path.suffix}'; use .jsonl or .csv")
    rows = []
    for where, record in records:
        if not isinstance(record, dict):
            raise AdagError(f"{path} {where}: expected an object with a 'prompt' field")
        try:
            rows.append(PromptRow(**record))
        except ValidationError as error:
            first = error.errors()[0]
            field = ".".join(str(part) for part in first["loc"]) or "row"
            problem = "missing field" if first["type"] == "missing" else first["msg"].lower()
            raise AdagError(f"{path} {where}: {problem} '{field}'") from None
    return rows


def _jsonl_records(path: Path) -> list[tuple[str, Any]]:
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append((f"line {number}", json.loads(line)))
        except json.JSONDecodeError as error:
            raise AdagError(f"{path} line {number}: not valid JSON ({error.msg})") from None
    return records


def _csv_records(path: Path) -> list[tuple[str, dict]]:
    """CSV: `prompt`, optional `seed_response` and `labels` (a JSON list or one label); other columns
    become metadata."""
    records = []
    with path.open(newline="", encoding="utf-8") as f:
        for number, row in enumerate(csv.DictReader(f), start=2):
            record: dict[str, Any] = {"metadata": {}}
            for key, value in row.items():
                if key in ("prompt", "seed_response"):
                    record[key] = value
                elif key == "labels":
                    record["labels"] = _csv_labels(value, path, number)
                else:
                    record["metadata"][key] = value
            records.append((f"line {number}", record))
    return records


def _csv_labels(value: str, path: Path, number: int) -> list[str]:
    if not value:
        return []
    if value.lstrip().startswith("["):
        try:
            return list(json.loads(value))
        except json.JSONDecodeError:
            raise AdagError(f"{path} line {number}: 'labels' is not a valid JSON list") from None
    return [value]


def format_prompt(tokenizer: Any, row: PromptRow) -> str:
    """Chat template plus seed response for instruct models; plain text for base models."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": row.prompt}], tokenize=False, add_generation_prompt=True
        )
        return text + row.seed_response
    return f"{row.prompt} {row.seed_response}".rstrip() if row.seed_response else row.prompt


def encode_prompt(tokenizer: Any, row: PromptRow) -> list[int]:
    """Token ids of the formatted prompt. Chat templates carry their own special tokens."""
    text = format_prompt(tokenizer, row)
    has_template = bool(getattr(tokenizer, "chat_template", None))
    return tokenizer(text, add_special_tokens=not has_template)["input_ids"]


def label_token_ids(tokenizer: Any, row: PromptRow, row_index: int) -> list[int]:
    """The token id of each label, which must be exactly one token for this tokenizer."""
    ids = []
    for label in row.labels:
        pieces = tokenizer(label, add_special_tokens=False)["input_ids"]
        if len(pieces) != 1:
            shown = [tokenizer.decode([p]) for p in pieces]
            raise AdagError(
                f"row {row_index}: label {label!r} is {len(pieces)} tokens {shown} for this tokenizer, "
                "not one; use a single-token label (often with a leading space, e.g. ' Paris')"
            )
        ids.append(pieces[0])
    return ids


__all__ = ["BUILTIN_DATASETS", "Dataset", "PromptRow", "encode_prompt", "format_prompt",
           "label_token_ids", "load_dataset"]
