"""What a stage leaves in RUN/.staging/<stage>/ while it runs: the sidecar files that let an interrupted
attempt resume, the `Shard` that owns some of its parts, and reading back the parts its writers recorded.
Below both `RunDir` (which reports an unfinished attempt) and `StageWriter` (which writes one)."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

from adag.errors import parse_json

STAGE_SIDECAR = ".stage.json"  # a staged stage's config and inputs, so an interrupted attempt can resume
PARTS_SIDECAR = ".parts{}.jsonl"  # one line per committed part of a staged resumable stage, per writer
SHARD_FACTS = ".facts-{}.json"  # the facts of one shard writer, for the writer that commits the stage


@dataclasses.dataclass(frozen=True)
class Shard:
    """One of `count` processes writing a resumable stage together; it owns the parts `index`,
    `index + count`, ... (so the split is the same in every process and on every rerun)."""

    index: int
    count: int

    def owns(self, part: int) -> bool:
        return part % self.count == self.index

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def read_parts(folder: Path, wanted: Callable[[str], bool] | None = None) -> dict[str, dict[str, Any]]:
    """Records of the parts that the writers of an attempt committed (those `wanted(file)` accepts);
    a line cut by an interruption is skipped (its part is then written again)."""
    records = {}
    for path in sorted(folder.glob(PARTS_SIDECAR.format("*"))):
        for line in path.read_text().splitlines():
            with contextlib.suppress(ValueError, KeyError, TypeError, AttributeError):
                record = parse_json(line)
                file = record.pop("file")
                if wanted is None or wanted(file):
                    records[file] = record
    return records
