"""The run's write lock: a `flock` on RUN/.lock, exclusive for one writing process or shared by the
shard writers of one stage, and the process-wide registry that makes it re-entrant within a process."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from adag.errors import AdagError, parse_json

LOCK = ".lock"
SHARD_PATIENCE_S = 10
_held_locks: dict[Path, list] = {}  # resolved run path -> [depth, shared]
_held_guard = threading.Lock()


class RunLocked(AdagError):
    """The run is being written by another process."""


@contextlib.contextmanager
def run_lock(run_path: Path, shared: bool = False) -> Iterator[None]:
    """Hold the write lock of the run at `run_path` (see `RunDir.lock`)."""
    key = run_path.resolve()
    with _held_guard:
        held = _held_locks.get(key)
        if held is not None and held[1] != shared:
            raise RunLocked(f"{run_path} is already locked by this process in another mode")
        if held is not None:
            held[0] += 1
    if held is not None:
        try:
            yield
        finally:
            with _held_guard:
                held[0] -= 1
        return
    fd = _acquire(run_path, shared)
    with _held_guard:
        _held_locks[key] = [1, shared]
    try:
        yield
    finally:
        with _held_guard:
            del _held_locks[key]
        _release(run_path, fd, shared)


def holds_lock(run_path: Path, shared: bool = False) -> bool:
    """Whether this process holds the lock of the run at `run_path` in this mode."""
    with _held_guard:
        held = _held_locks.get(run_path.resolve())
        return held is not None and held[1] == shared


def _acquire(run_path: Path, shared: bool) -> int:
    path = run_path / LOCK
    # A shard that starts while another checks whether it can commit (briefly exclusive) waits for it.
    deadline = time.monotonic() + (SHARD_PATIENCE_S if shared else 0)
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            raise AdagError(f"cannot write to {run_path} ({error.strerror}); check its permissions") from None
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _lock_holder(fd)
            os.close(fd)
            if time.monotonic() < deadline:
                time.sleep(0.1)
                continue
            raise RunLocked(f"{run_path} is being written by another adag process ({holder}); wait for it "
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


def _release(run_path: Path, fd: int, shared: bool) -> None:
    """Remove the lock file (so a dead process's lock never lingers) and unlock. A shard writer
    removes it only when no other shard writer still holds it."""
    try:
        if shared:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # gives up the shared lock either way
        (run_path / LOCK).unlink(missing_ok=True)
    except BlockingIOError:
        pass
    finally:
        os.close(fd)  # releases the flock


def _lock_holder(fd: int) -> str:
    try:
        holder = parse_json(os.pread(fd, 4096, 0) or b"{}")
        if "shards" in holder:
            return holder["shards"]
        return f"pid {holder['pid']}, started {holder['started']}"
    except (ValueError, KeyError, TypeError, AttributeError):
        return "holder unknown"
