"""Files of a run: written whole or not at all, recorded by size and SHA-256, checked against the record."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from adag.errors import AdagError


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
    """Why `path` does not match its record (None if it does): missing, unreadable, wrong size or, with
    `hashes`, other contents."""
    try:
        if not path.is_file():
            return "missing"
        size = path.stat().st_size
        if size != record["size"]:
            return f"{size} bytes, {record['size']} recorded"
        if hashes and file_record(path)["sha256"] != record["sha256"]:
            return "contents differ from the recorded SHA-256"
    except OSError as error:
        return unreadable_problem(error)
    return None


def checked_bytes(path: Path, record: dict[str, Any]) -> tuple[bytes | None, str | None]:
    """The contents of `path` if they match its record (size and SHA-256), else None and why not: a part
    swapped for another of the same size is caught before anything reads it."""
    problem = file_problem(path, record, hashes=False)  # first, so that nothing is read that cannot be right
    if problem is not None:
        return None, problem
    try:
        data = path.read_bytes()
    except OSError as error:
        return None, unreadable_problem(error)
    if len(data) != record["size"]:
        return None, f"{len(data)} bytes, {record['size']} recorded"
    if hashlib.sha256(data).hexdigest() != record["sha256"]:
        return None, "contents differ from the recorded SHA-256"
    return data, None


NO_PERMISSION = "no permission to read it"


def unreadable_problem(error: OSError) -> str:
    return NO_PERMISSION if isinstance(error, PermissionError) else f"unreadable: {error.strerror or error}"


def part_file(name: str, part: int) -> str:
    """Where part `part` of table `name` lives inside its stage's folder."""
    return f"{name}/part-{part:06d}.parquet"


def part_number(file: str) -> int:
    """The part a part file (as named by `part_file`) holds."""
    return int(file.rsplit("part-", 1)[1].split(".", 1)[0])



class DamagedFile(AdagError):
    """A committed file that no longer matches its record or cannot be read."""

