"""`StageWriter`: one attempt at a stage, staged beside the finished results and committed whole. Above
`RunDir`: the writer commits into the run, the run knows nothing of writers."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from adag.errors import AdagError, parse_json
from adag.store.files import atomic_write_bytes, file_problem, file_record, parquet_bytes, part_file, part_number
from adag.store.manifest import STAGING
from adag.store.run import RunDir
from adag.store.staging import PARTS_SIDECAR, SHARD_FACTS, STAGE_SIDECAR, Shard, read_parts

log = logging.getLogger("adag")


class StageWriter:
    """One attempt at a stage. Used as a context manager::

        with StageWriter(run, "cluster", config) as out:
            out.write_table("clusters", table)
            out.facts["clusters"] = 3

    Files go to RUN/.staging/<stage>/; on a normal exit the folder replaces RUN/<stage>/ and the
    manifest entry (config, inputs, facts, file sizes and hashes, id) is written; on an exception
    nothing finished changes. A resumable stage keeps its staging folder on failure, so that the
    next attempt with the same config skips the parts already written (`has_part`); with another
    config it starts over. A resumable stage rerun with the config of its finished result repairs
    that result in place: missing or damaged parts are redone, the others kept. The stage id is a
    hash of config and file contents, so a rerun that reproduces the same files leaves the stages
    built on it current; a rerun that reproduces the finished result exactly commits nothing at all.

    A shard writer (`shard`) of a resumable stage shares the run's lock with the other shards of the
    same attempt, writes its own parts into the common staging folder (never removing what others
    wrote), records them in its own sidecar and on exit commits nothing: it leaves its `facts` for the
    plain writer that commits (`shard_facts`), which resumes from every shard's parts. Shard writers
    check a finished result but leave its repair to a plain writer.
    """

    def __init__(self, run: RunDir, stage: str, config: dict[str, Any], inputs: dict[str, str] | None = None,
                 resumable: bool = False, command: str | None = None, shard: Shard | None = None):
        if shard is not None and not resumable:
            raise ValueError(f"stage '{stage}' is not resumable, so it cannot be written in shards")
        self.run, self.stage, self.config, self.inputs = run, stage, config, inputs or {}
        self.resumable, self.command, self.shard = resumable, command or f"adag {stage} {run.path}", shard
        self.facts: dict[str, Any] = {}
        self.cancelled = False
        self.rewritten = False  # whether this attempt wrote any file (a repair that wrote none changes nothing)
        self._records: dict[str, dict[str, Any]] = {}
        self._guard = threading.Lock()
        self._lock: contextlib.ExitStack | None = None
        entry = run.entry(stage)
        self.repairing = (resumable and entry is not None and entry["config"] == config
                          and entry["inputs"] == self.inputs)
        self.path = run.path / stage if self.repairing else run.path / STAGING / stage

    def __enter__(self) -> StageWriter:
        self._lock = contextlib.ExitStack()
        shared = self.shard is not None
        if not self.run.holds_lock(shared):  # under `pipeline.writing` it is held already
            self._lock.enter_context(self.run.lock(shared=shared))
        self.started = time.time()
        try:
            if self.repairing:
                self._records = {file: record for file, record in self.run.entry(self.stage)["files"].items()
                                 if self._owns(file)}
            else:
                self._open_staging()
            self._drop_damaged()
        except BaseException:
            self._lock.close()
            raise
        return self

    def _owns(self, file: str) -> bool:
        return self.shard is None or (file.count("/part-") == 1 and self.shard.owns(part_number(file)))

    def _open_staging(self) -> None:
        sidecar = self.path / STAGE_SIDECAR
        previous = None
        if sidecar.is_file():
            with contextlib.suppress(ValueError):
                previous = parse_json(sidecar.read_bytes())
            previous = previous if isinstance(previous, dict) else None
        same = bool(previous) and previous.get("config") == self.config and previous.get("inputs") == self.inputs
        if self.resumable and same:
            self._records = read_parts(self.path, self._owns)
            return
        contents = json.dumps({"config": self.config, "inputs": self.inputs, "command": self.command}).encode()
        if self.shard is not None:  # other shards may be writing here: never remove anything
            if previous:
                raise AdagError(f"{self.path} holds an unfinished '{self.stage}' with other settings; finish it "
                                "with those settings, or delete that folder")
            atomic_write_bytes(sidecar, contents, exclusive=True)  # shards of one attempt write the same
            return
        if self.path.exists():
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True)
        atomic_write_bytes(sidecar, contents)

    def _drop_damaged(self) -> None:
        damaged = {}
        for file, record in self._records.items():
            problem = file_problem(self.path / file, record, hashes=True)
            if problem:
                damaged[file] = problem
        for file in damaged:
            del self._records[file]
        if damaged:
            listed = ", ".join(f"{file} ({problem})" for file, problem in sorted(damaged.items()))
            if self.repairing and self.shard is not None:
                raise AdagError(f"the finished '{self.stage}' in {self.run.path} has damaged parts ({listed}); "
                                f"repair them with `{self.command}`")
            log.warning(f"{len(damaged)} damaged file(s) in {self.path} will be written again: {listed}")

    @property
    def resumed(self) -> bool:
        """Whether parts of an earlier attempt (or of the finished result) are being kept."""
        return bool(self._records)

    # writing

    def file(self, name: str) -> Path:
        """A path inside the stage's folder for a file written by other means (e.g. a plot)."""
        path = self.path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        with self._guard:  # rewritten (e.g. a whole table while repairing): recorded afresh
            self._records.pop(name, None)
            self.rewritten = True
        return path

    def write_table(self, name: str, table: pd.DataFrame | pa.Table) -> None:
        atomic_write_bytes(self.file(f"{name}.parquet"), parquet_bytes(table))

    def write_json(self, name: str, data: Any) -> None:
        atomic_write_bytes(self.file(f"{name}.json"), json.dumps(data, indent=2).encode())

    def publish_table(self, name: str, table: pd.DataFrame | pa.Table) -> None:
        """Write a table unless it is there already: of several shards that publish the same table, the
        first one's stands, so all of them go on with the same one (read it back with `read_table`)."""
        atomic_write_bytes(self.file(f"{name}.parquet"), parquet_bytes(table), exclusive=True)

    def write_part(self, name: str, part: int, table: pd.DataFrame | pa.Table) -> None:
        """Write one part and record it at once, so an interrupted stage keeps it."""
        if self.shard is not None and (self.repairing or not self.shard.owns(part)):
            raise ValueError(f"shard {self.shard} cannot write part {part} of '{self.stage}'")
        file = part_file(name, part)
        path = self.file(file)
        atomic_write_bytes(path, parquet_bytes(table))
        record = file_record(path)
        sidecar = PARTS_SIDECAR.format(f"-{self.shard.index}-of-{self.shard.count}" if self.shard else "")
        with self._guard:
            self._records[file] = record
            if self.repairing:
                self.run.update_entry(self.stage, files=dict(self._records))
            else:
                with (self.path / sidecar).open("a") as f:
                    f.write(json.dumps({"file": file, **record}) + "\n")

    def shard_facts(self) -> list[dict[str, Any]]:
        """The facts that the shard writers of this attempt left."""
        return [json.loads(path.read_text()) for path in sorted(self.path.glob(SHARD_FACTS.format("*")))]

    def has_part(self, name: str, part: int) -> bool:
        """Whether this part was written (by this attempt, an earlier one, or the finished result)
        and is intact."""
        return part_file(name, part) in self._records

    def has_table(self, name: str) -> bool:
        """Whether a whole table `name` was written (or published) in this attempt's folder."""
        return (self.path / f"{name}.parquet").is_file()

    def table_metadata(self, name: str) -> dict[str, str]:
        """The key-value metadata stored with a whole table."""
        metadata = pq.read_schema(self.path / f"{name}.parquet").metadata or {}
        return {key.decode(): value.decode() for key, value in metadata.items() if not key.startswith(b"pandas")}

    def read_part(self, name: str, part: int) -> pd.DataFrame:
        return pq.read_table(self.path / part_file(name, part)).to_pandas()

    def read_table(self, name: str, columns: list[str] | None = None) -> pd.DataFrame:
        """A table this attempt has written so far (whole or all its parts)."""
        tables = [pq.read_table(self.path / f, columns=columns) for f in self._table_files(name)]
        return pa.concat_tables(tables).to_pandas() if tables else pd.DataFrame(columns=columns)

    def table_rows(self, name: str) -> int:
        """The rows of a table this attempt has written so far, from its files' footers."""
        return sum(pq.read_metadata(self.path / f).num_rows for f in self._table_files(name))

    def _table_files(self, name: str) -> list[str]:
        return [f"{name}.parquet"] if (self.path / f"{name}.parquet").is_file() else sorted(
            f for f in self._records if f.startswith(f"{name}/part-"))

    def cancel(self) -> None:
        """Leave without committing anything (e.g. a dry run)."""
        self.cancelled = True

    # finishing

    def __exit__(self, kind, error, traceback) -> None:
        try:
            if self.shard is not None:
                if kind is None and not self.repairing:
                    name = SHARD_FACTS.format(f"{self.shard.index}-of-{self.shard.count}")
                    atomic_write_bytes(self.path / name, json.dumps(self.facts).encode())
            elif kind is not None or self.cancelled:
                self._abandon()
            else:
                self._finish()
        finally:
            self._lock.close()

    def _abandon(self) -> None:
        if self.repairing:
            return
        if not self.resumable or not self._records or self.cancelled:
            shutil.rmtree(self.path, ignore_errors=True)
            with contextlib.suppress(OSError):
                self.path.parent.rmdir()

    def _finish(self) -> None:
        if self.repairing and not self.rewritten:  # nothing to redo: the recorded result, timings included, stands
            return
        files = {}
        for path in sorted(p for p in self.path.rglob("*") if p.is_file()):
            file = path.relative_to(self.path).as_posix()
            if not any(part.startswith(".") for part in path.relative_to(self.path).parts):
                files[file] = self._records.get(file) or file_record(path)
        identity = json.dumps([self.config, self.inputs, files], sort_keys=True).encode()
        entry = {"status": "done", "id": hashlib.sha256(identity).hexdigest()[:16], "config": self.config,
                 "inputs": self.inputs, "files": files, "command": self.command,
                 "started": self.started, "seconds": round(time.time() - self.started, 2), **self.facts}
        if self.repairing:
            self.run.replace_entry(self.stage, entry)
        elif self._same_as_finished(entry["id"]):  # a no-op rerun: the run stays as it was, timings included
            self.cancelled = True
            self._abandon()
        else:
            self.run.commit(self.stage, self.path, entry)

    def _same_as_finished(self, identity: str) -> bool:
        """Whether the finished result is current, intact and has this id (same config, inputs and files)."""
        finished = self.run.entry(self.stage)
        return (finished is not None and finished["id"] == identity and self.run.stage_done(self.stage)
                and not self.run.verify(hashes=True, stages=(self.stage,)))
