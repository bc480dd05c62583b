"""The built-in datasets, and `load_dataset`, which finds a dataset by name or path."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from adag.datasets.builtin import addition, antonyms, country_capitals, state_capitals
from adag.datasets.files import read_rows
from adag.datasets.misleading import misleading_capitals
from adag.datasets.schema import Dataset, PromptRow
from adag.errors import AdagError, broken_link

BUILTIN_DATASETS: dict[str, tuple[Callable[[], list[dict]], str]] = {
    "country-capitals": (country_capitals, "one-hop: 'What is the capital of {country}?'"),
    "state-capitals": (state_capitals, "two-hop: 'What is the capital of the state containing {city}?'"),
    "addition": (addition, "'What is x + y?' for 100 random pairs of two-digit numbers"),
    "antonyms": (antonyms, "'What is the opposite of \"{word}\"?'"),
    "misleading-capitals": (misleading_capitals, "study: a false claim in 5 framings, or none, before the capital "
                            "question; 6 rows a country, labels [correct, misleading]"),
}


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
        rows = read_rows(path)
    if not rows:
        raise AdagError(f"dataset '{name_or_path}' has no rows")
    return Dataset(name_or_path, rows[:limit])
