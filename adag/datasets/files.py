"""Reading prompt rows from the user's JSONL and CSV files, every problem one line naming the file and line."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from adag.datasets.schema import ROW_FIELDS, PromptRow
from adag.errors import AdagError, parse_json, unreadable


def read_rows(path: Path) -> list[PromptRow]:
    """The rows of a .jsonl or .csv file."""
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
    try:
        data = path.read_bytes()
    except OSError as error:
        raise unreadable(path, error) from None
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
            records.append((f"line {number}", parse_json(line, unique_keys=True)))
        except ValueError as error:
            raise AdagError(f"{path} line {number}: not valid JSON ({getattr(error, 'msg', error)})") from None
    return records


def _csv_records(path: Path) -> list[tuple[str, dict]]:
    """CSV: `prompt`, optional `seed_response` and `labels` (a JSON list or one label); other columns
    become metadata, numbers where every filled cell of the column is one (empty cells then null).

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
    metadata: dict[str, list] = {}
    for column in header:
        if column not in ROW_FIELDS:
            metadata[column] = _column_values(path, column, [(start, row[column]) for start, row in records])
    return [(f"line {start}", _csv_record(row, {c: values[i] for c, values in metadata.items()}, path, start))
            for i, (start, row) in enumerate(records)]


def _csv_record(row: dict[str, str], metadata: dict[str, Any], path: Path, line: int) -> dict[str, Any]:
    record: dict[str, Any] = {"metadata": metadata}
    for key, value in row.items():
        if key == "labels":
            record["labels"] = _csv_labels(value, path, line)
        elif key in ROW_FIELDS:
            record[key] = value
    return record


def _column_values(path: Path, column: str, cells: list[tuple[int, str]]) -> list[Any]:
    """A metadata column's values. A column whose filled cells all read as numbers, some finite, is numeric:
    its cells become numbers (integers when all are), empty cells null, and NaN or inf there is refused, as
    in JSON. A column of words stays text and may hold the words "nan" or "infinity"."""
    numbers = [_as_number(cell) for _, cell in cells]
    filled = [(line, number) for (line, cell), number in zip(cells, numbers) if cell.strip()]
    if any(number is None for _, number in filled) or not any(math.isfinite(n) for _, n in filled):
        return [cell for _, cell in cells]
    for line, number in filled:
        if not math.isfinite(number):
            raise AdagError(f"{path} line {line}: column '{column}' is numeric but holds {number}; "
                            "leave the cell empty for a missing value")
    return numbers


def _as_number(cell: str) -> int | float | None:
    """The number a cell holds (an int when it is written as one), None for text or an empty cell."""
    for kind in (int, float):
        try:
            return kind(cell)
        except ValueError:
            continue
    return None


def _csv_labels(value: str, path: Path, number: int) -> list[str]:
    if not value:
        return []
    if value.lstrip().startswith("["):
        try:
            labels = parse_json(value)
        except ValueError:
            raise AdagError(f"{path} line {number}: 'labels' is not a valid JSON list") from None
        if not isinstance(labels, list):
            raise AdagError(f"{path} line {number}: 'labels' is not a valid JSON list")
        return labels
    return [value]
