"""Prompt datasets: built-ins, JSONL and CSV files, and how rows become token ids."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import string
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from adag.datasets.builtin import addition, antonyms, country_capitals, state_capitals
from adag.datasets.misleading import misleading_capitals
from adag.errors import AdagError, broken_link

BUILTIN_DATASETS: dict[str, tuple[Callable[[], list[dict]], str]] = {
    "country-capitals": (country_capitals, "one-hop: 'What is the capital of {country}?'"),
    "state-capitals": (state_capitals, "two-hop: 'What is the capital of the state containing {city}?'"),
    "addition": (addition, "'What is x + y?' for 100 random pairs of two-digit numbers"),
    "antonyms": (antonyms, "'What is the opposite of \"{word}\"?'"),
    "misleading-capitals": (misleading_capitals, "study: a false claim in 5 framings, or none, before the capital "
                            "question; 6 rows a country, labels [correct, misleading]"),
}

ROW_FIELDS = ("prompt", "seed_response", "labels")


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

    @field_validator("metadata")
    @classmethod
    def _finite_numbers(cls, value: dict[str, Any]) -> dict[str, Any]:
        """NaN and infinities would poison every statistic computed from metadata (correlate, measure)."""
        for key, item in value.items():
            if not _all_finite(item):
                raise ValueError(f"metadata '{key}' holds {item!r}, not a finite number; use null for a missing value")
        return value


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


def load_dataset(name_or_path: str, limit: int | None = None) -> Dataset:
    """A built-in dataset by name, or a .jsonl / .csv file; `limit` keeps the first rows."""
    if limit is not None and limit < 1:
        raise AdagError(f"limit must be at least 1 (got {limit}); leave it out to use every row")
    if name_or_path in BUILTIN_DATASETS:
        make, _ = BUILTIN_DATASETS[name_or_path]
        rows = [PromptRow(**raw) for raw in make()]
    else:
        path = Path(name_or_path).expanduser()
        if path.is_dir():
            raise AdagError(f"dataset '{name_or_path}' is a directory; pass a .jsonl or .csv file")
        if problem := broken_link(path):
            raise AdagError(f"dataset '{name_or_path}': {problem}; pass the .jsonl or .csv file itself")
        if not path.is_file():
            raise AdagError(
                f"unknown dataset '{name_or_path}': use a built-in ({', '.join(BUILTIN_DATASETS)}) "
                "or a path to a .jsonl or .csv file"
            )
        rows = _read_file(path)
    if not rows:
        raise AdagError(f"dataset '{name_or_path}' has no rows")
    return Dataset(name_or_path, rows[:limit])


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
            if first["type"] == "value_error":
                raise AdagError(f"{path} {where}: {first['ctx']['error']}") from None
            field = ".".join(str(part) for part in first["loc"]) or "row"
            problem = "missing field" if first["type"] == "missing" else first["msg"].lower()
            raise AdagError(f"{path} {where}: {problem} '{field}'") from None
    return rows


def _read_text(path: Path) -> str:
    """The file as text: UTF-8, with or without a byte-order mark."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise AdagError(f"{path} line {line}: not valid UTF-8 (byte {error.start} is {data[error.start]:#04x}); "
                        "save the file as UTF-8") from None


def _jsonl_records(path: Path) -> list[tuple[str, Any]]:
    records = []
    # Split on newlines only: str.splitlines would also break JSON strings holding U+2028 and the like.
    for number, line in enumerate(_read_text(path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            records.append((f"line {number}", json.loads(line)))
        except json.JSONDecodeError as error:
            raise AdagError(f"{path} line {number}: not valid JSON ({error.msg})") from None
    return records


def _csv_records(path: Path) -> list[tuple[str, dict]]:
    """CSV: `prompt`, optional `seed_response` and `labels` (a JSON list or one label); other columns
    become metadata.

    Quoting is parsed strictly: a field that opens with a quote must close with a quote followed by a
    comma or the end of its line, and every row must have the header's number of fields. A forgotten
    closing quote would otherwise swallow the following rows into one field; it is almost never both
    closed again by a later quote in that position and left with the right field count. Line breaks
    inside a properly quoted field stay allowed (multi-line prompts).
    """
    reader = csv.reader(io.StringIO(_read_text(path), newline=""), strict=True)
    header = next(reader, [])
    duplicates = sorted({column for column in header if header.count(column) > 1})
    if duplicates:
        raise AdagError(f"{path} line 1: column '{duplicates[0]}' appears more than once in the header; "
                        "keep one of them")
    records = []
    while True:
        start = reader.line_num + 1
        try:
            fields = next(reader)
        except StopIteration:
            break
        except csv.Error as error:
            raise AdagError(
                f"{path} line {start}: malformed quoting ({error}); a field that opens with a quote must close "
                'with one before the next comma or line end, and a quote inside it is written ""'
            ) from None
        if not fields:
            continue
        if len(fields) != len(header):
            raise AdagError(f"{path} line {start}: {len(fields)} fields but the header has {len(header)}; "
                            "quote fields that contain commas")
        records.append((start, dict(zip(header, fields))))
    for column in header:
        if column not in ROW_FIELDS:
            _check_numeric_column(path, column, [(start, row[column]) for start, row in records])
    return [(f"line {start}", _csv_record(row, path, start)) for start, row in records]


def _csv_record(row: dict[str, str], path: Path, line: int) -> dict[str, Any]:
    record: dict[str, Any] = {"metadata": {}}
    for key, value in row.items():
        if key == "labels":
            record["labels"] = _csv_labels(value, path, line)
        elif key in ROW_FIELDS:
            record[key] = value
        else:
            record["metadata"][key] = value
    return record


def _check_numeric_column(path: Path, column: str, cells: list[tuple[int, str]]) -> None:
    """A metadata column whose filled cells all read as numbers, some finite, is numeric: NaN or inf there
    is refused, as in JSON. A column of words may hold the words "nan" or "infinity"."""
    numbers = [(line, _as_number(cell)) for line, cell in cells if cell.strip()]
    if any(number is None for _, number in numbers) or not any(math.isfinite(n) for _, n in numbers):
        return
    for line, number in numbers:
        if not math.isfinite(number):
            raise AdagError(f"{path} line {line}: column '{column}' is numeric but holds {number}; "
                            "leave the cell empty for a missing value")


def _as_number(cell: str) -> float | None:
    try:
        return float(cell)
    except ValueError:
        return None


def _csv_labels(value: str, path: Path, number: int) -> list[str]:
    if not value:
        return []
    if value.lstrip().startswith("["):
        try:
            return list(json.loads(value))
        except json.JSONDecodeError:
            raise AdagError(f"{path} line {number}: 'labels' is not a valid JSON list") from None
    return [value]


PromptFormat = Literal["auto", "chat", "plain"]
# How a row reads for a model without a chat template (or under --prompt-format plain): the built-in
# datasets' seed "Answer:" makes "What is the capital of France? Answer:".
DEFAULT_BASE_TEMPLATE = "{prompt} {seed_response}"
TEMPLATE_FIELDS = {"prompt", "seed_response"}


def check_base_template(template: str) -> str:
    """A base template must place {prompt} and may place {seed_response}; nothing else."""
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as error:
        raise ValueError(f"base template {template!r} is not a valid format string ({error}); "
                         "write literal braces as {{ and }}") from None
    if "prompt" not in fields or not fields <= TEMPLATE_FIELDS:
        raise ValueError(f"base template {template!r} must contain {{prompt}} and may contain {{seed_response}}, "
                         f"no other fields (found {', '.join(sorted(fields)) or 'none'})")
    return template


def uses_chat_template(tokenizer: Any, prompt_format: PromptFormat = "auto") -> bool:
    """Whether prompts go through the tokenizer's chat template: with `auto`, whenever it has one."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if prompt_format == "chat" and not has_template:
        raise AdagError("--prompt-format chat: this model's tokenizer has no chat template (a base model); "
                        "use --prompt-format auto or plain")
    return has_template if prompt_format == "auto" else prompt_format == "chat"


def format_prompt(tokenizer: Any, row: PromptRow, prompt_format: PromptFormat = "auto",
                  base_template: str = DEFAULT_BASE_TEMPLATE) -> str:
    """The exact text traced: the chat template plus the seed response for chat models, `base_template`
    filled with the row for base models (or under `prompt_format="plain"`)."""
    if uses_chat_template(tokenizer, prompt_format):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": row.prompt}], tokenize=False, add_generation_prompt=True
        )
        return text + row.seed_response
    return base_template.format(prompt=row.prompt, seed_response=row.seed_response).strip()


def encode_prompt(tokenizer: Any, row: PromptRow, prompt_format: PromptFormat = "auto",
                  base_template: str = DEFAULT_BASE_TEMPLATE) -> list[int]:
    """Token ids of the formatted prompt."""
    return encode_text(tokenizer, format_prompt(tokenizer, row, prompt_format, base_template),
                       uses_chat_template(tokenizer, prompt_format))


def format_messages(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """A conversation as a chat model reads it (its template), or for a base model as a plain transcript
    that ends where the assistant's reply begins."""
    if uses_chat_template(tokenizer):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    speaker = {"user": "User: ", "assistant": "Assistant: "}
    turns = [speaker.get(message["role"], "") + message["content"] for message in messages]
    return "\n\n".join([*turns, "Assistant:"])


def encode_text(tokenizer: Any, text: str, chat: bool) -> list[int]:
    """Token ids of formatted text. Chat templates carry their own special tokens; plain text gets the
    tokenizer's (e.g. a beginning-of-sequence token)."""
    return tokenizer(text, add_special_tokens=not chat)["input_ids"]


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


__all__ = ["BUILTIN_DATASETS", "DEFAULT_BASE_TEMPLATE", "Dataset", "PromptFormat", "PromptRow", "check_base_template",
           "encode_prompt", "encode_text", "format_messages", "format_prompt", "label_token_ids", "load_dataset",
           "uses_chat_template"]
