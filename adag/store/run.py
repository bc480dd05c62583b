"""`RunDir`: a run directory's manifest, its stages' states, crash-safe commits and checked reads."""

from __future__ import annotations

import contextlib
import json
import shlex
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from adag.errors import AdagError, parse_json
from adag.store.files import NO_PERMISSION, DamagedFile, atomic_write_bytes, checked_bytes, file_problem
from adag.store.lock import holds_lock, run_lock
from adag.store.manifest import MANIFEST, STAGING, check_run_target, new_manifest, read_manifest
from adag.store.staging import STAGE_SIDECAR, read_parts


class RunDir:
    """A run directory. Open an existing one with `RunDir.open`, start one with `RunDir.create`."""

    def __init__(self, path: Path, manifest: dict[str, Any]):
        self.path = path
        self.manifest = manifest
        self._manifest_guard = threading.Lock()

    @classmethod
    def create(cls, path: str | Path, model: dict[str, Any], dataset: dict[str, Any]) -> RunDir:
        """Start a run, or reopen the same run (same model and dataset) to resume it."""
        path = Path(path)
        check_run_target(path)
        if (path / MANIFEST).exists():
            run = cls.open(path)
            for key, value in (("model", model), ("dataset", dataset)):
                if run.manifest[key] != value:
                    raise AdagError(
                        f"{path} already holds a run with a different {key}; "
                        "choose another output directory or delete this one"
                    )
            return run
        manifest = new_manifest(model, dataset)
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise AdagError(f"cannot create run directory {path} ({error.strerror}); choose another --out") from None
        if not atomic_write_bytes(path / MANIFEST, json.dumps(manifest, indent=1).encode(), exclusive=True):
            return cls.create(path, model, dataset)  # a concurrent shard created it first
        return cls(path, manifest)

    @classmethod
    def open(cls, path: str | Path) -> RunDir:
        path = Path(path)
        run = cls(path, read_manifest(path))
        if "pending" in run.manifest:
            run._finish_interrupted_commit()
        return run

    def reload(self) -> None:
        """Read the manifest again (another process may have committed a stage since)."""
        self.manifest = read_manifest(self.path)

    def _save_manifest(self) -> None:
        atomic_write_bytes(self.path / MANIFEST, json.dumps(self.manifest, indent=1).encode())

    # locking

    @contextlib.contextmanager
    def lock(self, shared: bool = False) -> Iterator[None]:
        """Hold the run's write lock: one writing process at a time, or with `shared` the shard writers
        of one stage together (`Shard`), which still exclude every other writer. A process that cannot
        have it gets a one-line error naming the holder (`RunLocked`). The lock is a `flock` on RUN/.lock,
        so it dies with its process: a lock file left by a dead process is simply taken over. Re-entrant
        within a process, in the same mode."""
        with run_lock(self.path, shared):
            yield

    def holds_lock(self, shared: bool = False) -> bool:
        """Whether this process holds the run's lock in this mode."""
        return holds_lock(self.path, shared)

    # stages

    def entry(self, stage: str) -> dict[str, Any] | None:
        return self.manifest["stages"].get(stage)

    def stage_config(self, stage: str) -> dict[str, Any] | None:
        entry = self.entry(stage)
        return entry["config"] if entry else None

    def stage_state(self, stage: str) -> str:
        """'missing', 'done', or 'stale' (done, but a stage it read has since been recommitted)."""
        entry = self.entry(stage)
        if entry is None:
            return "missing"
        for source, source_id in entry.get("inputs", {}).items():
            if self.stage_state(source) != "done" or self.entry(source)["id"] != source_id:
                return "stale"
        return "done"

    def stage_done(self, stage: str) -> bool:
        return self.stage_state(stage) == "done"

    def require_stage(self, stage: str, command: str) -> None:
        state = self.stage_state(stage)
        if state == "stale":
            raise AdagError(f"the '{stage}' results in {self.path} are stale (a stage they were computed from "
                            f"was rerun); rerun `{command}` first")
        if state != "done":
            raise AdagError(f"{self.path} has no finished '{stage}' stage; run `{command}` first")

    def staged_attempt(self, stage: str) -> dict[str, Any] | None:
        """Config, inputs and command of an earlier, unfinished attempt at `stage` that left finished parts."""
        sidecar = self.path / STAGING / stage / STAGE_SIDECAR
        if not sidecar.is_file() or not self.staged_parts(stage):
            return None
        with contextlib.suppress(ValueError, OSError):
            attempt = parse_json(sidecar.read_bytes())
            return attempt if isinstance(attempt, dict) else None
        return None

    def staged_parts(self, stage: str) -> dict[str, dict[str, Any]]:
        """The parts that the writers of an unfinished attempt at `stage` have recorded, by file."""
        return read_parts(self.path / STAGING / stage)

    # the manifest: changed only under the run's exclusive lock, by the stage writer

    def commit(self, stage: str, staged: Path, entry: dict[str, Any]) -> None:
        """Swap a complete staged folder into place. The manifest first records the commit as pending,
        so that an interruption between the renames is finished by the next `RunDir.open`."""
        self.manifest["pending"] = {"stage": stage, "entry": entry}
        self._save_manifest()
        self._finish_interrupted_commit(staged)

    def _finish_interrupted_commit(self, staged: Path | None = None) -> None:
        pending = self.manifest["pending"]
        stage = pending["stage"]
        staged = staged or self.path / STAGING / stage
        if not self.holds_lock():
            try:
                with self.lock():
                    self.reload()
                    if "pending" in self.manifest:
                        self._finish_interrupted_commit(staged)
            except (AdagError, OSError):
                pass  # the writer is still at work (or the run is read-only); the previous results stand
            return
        final, old = self.path / stage, self.path / STAGING / f"{stage}.replaced"
        if staged.is_dir() and (staged / STAGE_SIDECAR).is_file():
            shutil.rmtree(old, ignore_errors=True)
            if final.exists():
                final.rename(old)
            staged.rename(final)
        for sidecar in final.glob(".*"):  # the stage sidecar, the writers' part records and facts
            if sidecar.is_file():
                sidecar.unlink()
        self.manifest["stages"][stage] = pending["entry"]
        del self.manifest["pending"]
        self._save_manifest()
        shutil.rmtree(old, ignore_errors=True)
        with contextlib.suppress(OSError):
            (self.path / STAGING).rmdir()

    def update_entry(self, stage: str, **changes: Any) -> None:
        """Change fields of a finished stage's entry (a part repaired in place) and save at once."""
        with self._manifest_guard:
            self.manifest["stages"][stage].update(changes)
            self._save_manifest()

    def replace_entry(self, stage: str, entry: dict[str, Any]) -> None:
        """Record a stage repaired in place (its folder already holds the files `entry` lists)."""
        with self._manifest_guard:
            self.manifest["stages"][stage] = entry
            self._save_manifest()

    # tables

    def has_table(self, stage: str, name: str) -> bool:
        files = (self.entry(stage) or {}).get("files", {})
        return f"{name}.parquet" in files or any(f.startswith(f"{name}/") for f in files)

    def read_table(self, stage: str, name: str, columns: list[str] | None = None) -> pd.DataFrame:
        """A table written whole or in parts. Files are checked against their recorded sizes first."""
        entry = self.entry(stage)
        if entry is None or not self.has_table(stage, name):
            raise AdagError(f"{self.path} has no table '{stage}/{name}'; run the '{stage}' stage first")
        files = entry["files"]
        names = [f"{name}.parquet"] if f"{name}.parquet" in files else sorted(
            f for f in files if f.startswith(f"{name}/part-"))
        tables = [self._read_parquet(stage, file, columns) for file in names]
        return pa.concat_tables(tables).to_pandas() if tables else pd.DataFrame(columns=columns)

    def _read_parquet(self, stage: str, file: str, columns: list[str] | None) -> pa.Table:
        data = self._checked_bytes(stage, file)
        try:
            return pq.read_table(pa.BufferReader(data), columns=columns)
        except (pa.ArrowException, OSError) as error:
            raise self.damaged(stage, file, f"unreadable: {str(error).splitlines()[0][:120]}") from None

    def _checked_bytes(self, stage: str, file: str) -> bytes:
        """A committed file's contents, checked against its recorded size and SHA-256 (every read, so that
        a part swapped for another, or edited, is named instead of read as if it were the right one)."""
        data, problem = checked_bytes(self.path / stage / file, self.manifest["stages"][stage]["files"][file])
        if problem is not None:
            raise self.damaged(stage, file, problem)
        return data

    def damaged(self, stage: str, file: str, problem: str) -> DamagedFile:
        path, command = self.path / stage / file, self.command(stage)
        if problem == NO_PERMISSION:
            return DamagedFile(f"cannot read {path} (no permission); give yourself read permission "
                               f"(chmod u+r), or rewrite it with `{command}`")
        return DamagedFile(f"{path} is damaged ({problem}); rewrite it with `{command}`")

    def command(self, stage: str) -> str:
        """The command that made `stage`, naming this run where it is now (it may have been copied or
        moved since): following a hint must act on this run, not on the one it was made as."""
        recorded = (self.entry(stage) or {}).get("command")
        if not recorded:
            return f"adag {stage} {shlex.quote(str(self.path))}"
        try:
            words = shlex.split(recorded)
        except ValueError:
            return recorded
        where = words.index("--out") + 1 if "--out" in words else 2  # the run: --out for trace, else RUN
        if len(words) <= where or words[0] != "adag" or words[where].startswith("-"):
            return recorded
        if Path(words[where]).expanduser().resolve() == self.path.resolve():
            return recorded
        words[where] = str(self.path)
        return shlex.join(words)

    def has_file(self, stage: str, file: str) -> bool:
        """Whether the manifest records `file` (a path inside the stage's folder) for `stage`."""
        return file in (self.entry(stage) or {}).get("files", {})

    def read_bytes(self, stage: str, file: str) -> bytes:
        """A file the manifest records for `stage` (e.g. "plots/overview.png"), checked against its recorded size."""
        if not self.has_file(stage, file):
            raise AdagError(f"{self.path} has no '{stage}/{file}'; run the '{stage}' stage first")
        return self._checked_bytes(stage, file)

    def read_json(self, stage: str, name: str) -> Any:
        file = f"{name}.json"
        try:
            return json.loads(self.read_bytes(stage, file).decode())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise self.damaged(stage, file, "not valid JSON") from None

    def verify(self, hashes: bool = False, stages: tuple[str, ...] | None = None) -> list[str]:
        """One line per committed file (of `stages`, or of every stage) that is missing or damaged: sizes
        always, contents with `hashes`."""
        problems = []
        for stage, entry in self.manifest["stages"].items():
            if stages is not None and stage not in stages:
                continue
            for file, record in entry.get("files", {}).items():
                problem = file_problem(self.path / stage / file, record, hashes)
                if problem:
                    problems.append(str(self.damaged(stage, file, problem)))
        return problems

