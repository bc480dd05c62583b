"""The run directory every stage reads and writes: a JSON manifest and Parquet tables.

Layout::

    RUN/manifest.json                 adag version, model, dataset, and per stage: config, inputs, files
    RUN/<stage>/<table>.parquet       a stage's finished results, in a folder it alone owns
    RUN/<stage>/<table>/part-<n>.parquet   tables written in parts by long, resumable stages
    RUN/.staging/<stage>/             a stage's results while it runs; moved into place when complete
    RUN/.lock                         held (flock) by the one process writing the run, or shared by the
                                      shard writers of one resumable stage (`Shard`)

Nothing finished is deleted before its replacement is complete: a stage writes into
`.staging/<stage>/` and only on success swaps it in (`StageWriter`). A failed or interrupted stage
leaves the results and the manifest as they were. A stage's manifest entry records the ids of the
stages it read (`inputs`); when one of those is recommitted with other results, the entry is
*stale*: its files stay until the stage is rerun, but readers refuse it. Every committed file's
size and SHA-256 are recorded, so a damaged file is named (with the command that rewrites it)
instead of failing deep inside a reader.

A resumable stage can be written by several processes at once, each a `Shard` owning every
count-th part; each records its parts in its own sidecar, and a final writer checks that every
part is there and commits (see `StageWriter`).

Every write goes to a temporary file that is renamed into place. Nothing is pickled: a run
directory is safe to open.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from adag import __version__
from adag.errors import AdagError

FORMAT_VERSION = 3  # 2: staged stages and file records; 3: trace embeddings table, direct embedding edges
MANIFEST = "manifest.json"
LOCK = ".lock"
STAGING = ".staging"
STAGE_SIDECAR = ".stage.json"  # a staged stage's config and inputs, so an interrupted attempt can resume
PARTS_SIDECAR = ".parts{}.jsonl"  # one line per committed part of a staged resumable stage, per writer
SHARD_FACTS = ".facts-{}.json"  # the facts of one shard writer, for the writer that commits the stage
SHARD_PATIENCE_S = 10
MANIFEST_KEYS = {"adag_version": str, "format_version": int, "created": str, "model": dict, "dataset": dict,
                 "stages": dict}
ENTRY_KEYS = ("status", "id", "config", "inputs", "files", "command", "started", "seconds")

log = logging.getLogger("adag")
_held_locks: dict[Path, list] = {}  # path -> [depth, shared]
_held_guard = threading.Lock()


def atomic_write_bytes(path: Path, data: bytes, exclusive: bool = False) -> bool:
    """Write `path` whole or not at all. With `exclusive`, leave an existing `path` as it is (the first
    of several concurrent writers wins, also on NFS: a hard link is atomic there) and return False."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # mkstemp makes files private; run files are meant to be shared
        if not exclusive:
            os.replace(tmp, path)
            return True
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        finally:
            Path(tmp).unlink(missing_ok=True)
        return True
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def parquet_bytes(table: pd.DataFrame | pa.Table) -> bytes:
    if isinstance(table, pd.DataFrame):
        table = pa.Table.from_pandas(table, preserve_index=False)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue().to_pybytes()


def file_record(path: Path) -> dict[str, Any]:
    """Size and SHA-256 of a file, as recorded in the manifest."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {"size": path.stat().st_size, "sha256": digest.hexdigest()}


def file_problem(path: Path, record: dict[str, Any], hashes: bool) -> str | None:
    """Why `path` does not match its record (None if it does): missing, wrong size or, with
    `hashes`, other contents."""
    if not path.is_file():
        return "missing"
    size = path.stat().st_size
    if size != record["size"]:
        return f"{size} bytes, {record['size']} recorded"
    if hashes and file_record(path)["sha256"] != record["sha256"]:
        return "contents differ from the recorded SHA-256"
    return None


def part_file(name: str, part: int) -> str:
    """Where part `part` of table `name` lives inside its stage's folder."""
    return f"{name}/part-{part:06d}.parquet"


def part_number(file: str) -> int:
    """The part a part file (as named by `part_file`) holds."""
    return int(file.rsplit("part-", 1)[1].split(".", 1)[0])


class DamagedFile(AdagError):
    """A committed file that no longer matches its record or cannot be read."""


class RunLocked(AdagError):
    """The run is being written by another process."""


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
        manifest = {
            "adag_version": __version__,
            "format_version": FORMAT_VERSION,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "model": model,
            "dataset": dataset,
            "stages": {},
        }
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
        key = self.path.resolve()
        with _held_guard:
            held = _held_locks.get(key)
            if held is not None and held[1] != shared:
                raise RunLocked(f"{self.path} is already locked by this process in another mode")
            if held is not None:
                held[0] += 1
        if held is not None:
            try:
                yield
            finally:
                with _held_guard:
                    held[0] -= 1
            return
        fd = self._acquire(shared)
        with _held_guard:
            _held_locks[key] = [1, shared]
        try:
            yield
        finally:
            with _held_guard:
                del _held_locks[key]
            self._release(fd, shared)

    def _acquire(self, shared: bool) -> int:
        path = self.path / LOCK
        # A shard that starts while another checks whether it can commit (briefly exclusive) waits for it.
        deadline = time.monotonic() + (SHARD_PATIENCE_S if shared else 0)
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as error:
                raise AdagError(f"cannot write to {self.path} ({error.strerror}); check its permissions") from None
            try:
                fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _lock_holder(fd)
                os.close(fd)
                if time.monotonic() < deadline:
                    time.sleep(0.1)
                    continue
                raise RunLocked(f"{self.path} is being written by another adag process ({holder}); wait for it "
                                "to finish or stop it, then rerun") from None
            try:
                same_file = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same_file = False
            if same_file:  # not a lock file that its holder removed while we waited
                break
            os.close(fd)
        # Shard writers all write the same words, so that they never garble each other's.
        holder = {"shards": "the shard writers of one stage"} if shared else \
            {"pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S%z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        return fd

    def _release(self, fd: int, shared: bool) -> None:
        """Remove the lock file (so a dead process's lock never lingers) and unlock. A shard writer
        removes it only when no other shard writer still holds it."""
        try:
            if shared:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # gives up the shared lock either way
            (self.path / LOCK).unlink(missing_ok=True)
        except BlockingIOError:
            pass
        finally:
            os.close(fd)  # releases the flock

    def is_locked_here(self) -> bool:
        """Whether this process holds the run's exclusive lock."""
        with _held_guard:
            held = _held_locks.get(self.path.resolve())
            return held is not None and not held[1]

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

    def stage(self, stage: str, config: dict[str, Any], inputs: dict[str, str] | None = None,
              resumable: bool = False, command: str | None = None, shard: Shard | None = None) -> StageWriter:
        """A writer for one attempt at `stage` (use it as a context manager; see StageWriter)."""
        return StageWriter(self, stage, config, inputs or {}, resumable, command or f"adag {stage} {self.path}",
                           shard)

    def staged_attempt(self, stage: str) -> dict[str, Any] | None:
        """Config, inputs and command of an earlier, unfinished attempt at `stage` that left finished parts."""
        sidecar = self.path / STAGING / stage / STAGE_SIDECAR
        if not sidecar.is_file() or not self.staged_parts(stage):
            return None
        with contextlib.suppress(ValueError):
            return json.loads(sidecar.read_text())
        return None

    def staged_parts(self, stage: str) -> dict[str, dict[str, Any]]:
        """The parts that the writers of an unfinished attempt at `stage` have recorded, by file."""
        return _read_parts(self.path / STAGING / stage)

    def _commit(self, stage: str, staged: Path, entry: dict[str, Any]) -> None:
        """Swap a complete staged folder into place. The manifest first records the commit as pending,
        so that an interruption between the renames is finished by the next `RunDir.open`."""
        self.manifest["pending"] = {"stage": stage, "entry": entry}
        self._save_manifest()
        self._finish_interrupted_commit(staged)

    def _finish_interrupted_commit(self, staged: Path | None = None) -> None:
        pending = self.manifest["pending"]
        stage = pending["stage"]
        staged = staged or self.path / STAGING / stage
        if not self.is_locked_here():
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

    def _update_entry(self, stage: str, **changes: Any) -> None:
        with self._manifest_guard:
            self.manifest["stages"][stage].update(changes)
            self._save_manifest()

    # tables

    def table_path(self, stage: str, name: str) -> Path:
        return self.path / stage / f"{name}.parquet"

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
        path = self.path / stage / file
        problem = file_problem(path, self.manifest["stages"][stage]["files"][file], hashes=False)
        if problem is None:
            try:
                return pq.read_table(path, columns=columns)
            except (pa.ArrowException, OSError) as error:
                problem = f"unreadable: {str(error).splitlines()[0][:120]}"
        raise self.damaged(stage, file, problem)

    def damaged(self, stage: str, file: str, problem: str) -> DamagedFile:
        command = (self.entry(stage) or {}).get("command", f"adag {stage} {self.path}")
        return DamagedFile(f"{self.path / stage / file} is damaged ({problem}); rewrite it with `{command}`")

    def read_json(self, stage: str, name: str) -> Any:
        file = f"{name}.json"
        path = self.path / stage / file
        record = (self.entry(stage) or {}).get("files", {}).get(file)
        if record is None:
            raise AdagError(f"{self.path} has no '{stage}/{file}'; run the '{stage}' stage first")
        problem = file_problem(path, record, hashes=False)
        if problem is None:
            try:
                return json.loads(path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError):
                problem = "not valid JSON"
        raise self.damaged(stage, file, problem)

    def verify(self, hashes: bool = False) -> list[str]:
        """One line per committed file that is missing or damaged: sizes always, contents with `hashes`."""
        problems = []
        for stage, entry in self.manifest["stages"].items():
            for file, record in entry.get("files", {}).items():
                problem = file_problem(self.path / stage / file, record, hashes)
                if problem:
                    problems.append(str(self.damaged(stage, file, problem)))
        return problems


def check_run_target(path: Path) -> None:
    """`path` can hold a new run, or holds a run: not a file, not a folder of other things."""
    if path.exists() and not path.is_dir():
        raise AdagError(f"{path} is a file, not a directory; give --out a new or existing run directory")
    if path.is_dir() and not (path / MANIFEST).exists() and any(
            not entry.name.startswith(f".{MANIFEST}.") for entry in path.iterdir()):  # a manifest being written
        raise AdagError(f"{path} exists, is not empty and is not an adag run; choose another directory")


def read_manifest(path: Path) -> dict[str, Any]:
    """The manifest, checked for shape: any damage is one line naming the file."""
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise AdagError(f"{path} is not an adag run directory (no {MANIFEST}); create one with `adag trace`")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise AdagError(f"{manifest_path} is not valid JSON; the run directory is damaged") from None
    if not isinstance(manifest, dict):
        raise AdagError(f"{manifest_path} holds a JSON {type(manifest).__name__}, not an object; "
                        "the run directory is damaged")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise AdagError(
            f"{path} was written in run format {version} (adag {manifest.get('adag_version', '?')}); "
            f"this adag {__version__} reads format {FORMAT_VERSION}; rerun the stages with this version"
        )
    for key, kind in MANIFEST_KEYS.items():
        if not isinstance(manifest.get(key), kind):
            raise AdagError(f"{manifest_path} lacks '{key}' (or it is not a {kind.__name__}); "
                            "the run directory is damaged")
    for stage, entry in manifest["stages"].items():
        if not isinstance(entry, dict) or not all(key in entry for key in ("id", "config", "inputs", "files")):
            raise AdagError(f"{manifest_path}: the entry of stage '{stage}' is damaged; "
                            f"rerun `adag {stage}` into a new run directory")
    return manifest


def _lock_holder(fd: int) -> str:
    try:
        holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
        if "shards" in holder:
            return holder["shards"]
        return f"pid {holder['pid']}, started {holder['started']}"
    except (ValueError, KeyError, TypeError):
        return "holder unknown"


class StageWriter:
    """One attempt at a stage. Used as a context manager::

        with run.stage("cluster", config) as out:
            out.write_table("clusters", table)
            out.facts["clusters"] = 3

    Files go to RUN/.staging/<stage>/; on a normal exit the folder replaces RUN/<stage>/ and the
    manifest entry (config, inputs, facts, file sizes and hashes, id) is written; on an exception
    nothing finished changes. A resumable stage keeps its staging folder on failure, so that the
    next attempt with the same config skips the parts already written (`has_part`); with another
    config it starts over. A resumable stage rerun with the config of its finished result repairs
    that result in place: missing or damaged parts are redone, the others kept. The stage id is a
    hash of config and file contents, so a rerun that reproduces the same files leaves the stages
    built on it current.

    A shard writer (`shard`) of a resumable stage shares the run's lock with the other shards of the
    same attempt, writes its own parts into the common staging folder (never removing what others
    wrote), records them in its own sidecar and on exit commits nothing: it leaves its `facts` for the
    plain writer that commits (`shard_facts`), which resumes from every shard's parts. Shard writers
    check a finished result but leave its repair to a plain writer.
    """

    def __init__(self, run: RunDir, stage: str, config: dict[str, Any], inputs: dict[str, str], resumable: bool,
                 command: str, shard: Shard | None = None):
        if shard is not None and not resumable:
            raise ValueError(f"stage '{stage}' is not resumable, so it cannot be written in shards")
        self.run, self.stage, self.config, self.inputs = run, stage, config, inputs
        self.resumable, self.command, self.shard = resumable, command, shard
        self.facts: dict[str, Any] = {}
        self.cancelled = False
        self.rewritten = False  # whether this attempt wrote any file (a repair that wrote none changes nothing)
        self._records: dict[str, dict[str, Any]] = {}
        self._guard = threading.Lock()
        self._lock: contextlib.ExitStack | None = None
        entry = run.entry(stage)
        self.repairing = resumable and entry is not None and entry["config"] == config and entry["inputs"] == inputs
        self.path = run.path / stage if self.repairing else run.path / STAGING / stage

    def __enter__(self) -> StageWriter:
        self._lock = contextlib.ExitStack()
        self._lock.enter_context(self.run.lock(shared=self.shard is not None))
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
                previous = json.loads(sidecar.read_text())
        same = bool(previous) and previous.get("config") == self.config and previous.get("inputs") == self.inputs
        if self.resumable and same:
            self._records = _read_parts(self.path, self._owns)
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
                self.run._update_entry(self.stage, files=dict(self._records))
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
        files = [f"{name}.parquet"] if (self.path / f"{name}.parquet").is_file() else sorted(
            f for f in self._records if f.startswith(f"{name}/part-"))
        tables = [pq.read_table(self.path / f, columns=columns) for f in files]
        return pa.concat_tables(tables).to_pandas() if tables else pd.DataFrame(columns=columns)

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
            with self.run._manifest_guard:
                self.run.manifest["stages"][self.stage] = entry
                self.run._save_manifest()
        else:
            self.run._commit(self.stage, self.path, entry)


def _read_parts(folder: Path, wanted: Callable[[str], bool] | None = None) -> dict[str, dict[str, Any]]:
    """Records of the parts that the writers of an attempt committed (those `wanted(file)` accepts);
    a line cut by an interruption is skipped (its part is then written again)."""
    records = {}
    for path in sorted(folder.glob(PARTS_SIDECAR.format("*"))):
        for line in path.read_text().splitlines():
            with contextlib.suppress(ValueError, KeyError, TypeError):
                record = json.loads(line)
                file = record.pop("file")
                if wanted is None or wanted(file):
                    records[file] = record
    return records
