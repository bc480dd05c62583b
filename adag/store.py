"""The run directory every stage reads and writes: a JSON manifest and Parquet tables.

Layout::

    RUN_DIR/manifest.json        adag version, model, dataset, per-stage config, status and timings
    RUN_DIR/<stage>/<table>.parquet
    RUN_DIR/<stage>/<table>/part-<n>.parquet   tables written in parts by long, resumable stages

Every write goes to a temporary file that is renamed into place, so an interrupted run leaves
either the old file or the new one. Nothing is pickled: a run directory is safe to open.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from adag import __version__
from adag.errors import AdagError

FORMAT_VERSION = 2  # 2: trace embeddings table, direct embedding edges
MANIFEST = "manifest.json"
PIPELINE = ("trace", "cluster", "describe", "steer")  # a stage's outputs depend on the stages before it


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # mkstemp makes files private; run files are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class RunDir:
    """A run directory. Open an existing one with `RunDir.open`, start one with `RunDir.create`."""

    def __init__(self, path: Path, manifest: dict[str, Any]):
        self.path = path
        self.manifest = manifest

    @classmethod
    def create(cls, path: str | Path, model: dict[str, Any], dataset: dict[str, Any]) -> RunDir:
        """Start a run, or reopen the same run (same model and dataset) to resume it."""
        path = Path(path)
        if (path / MANIFEST).exists():
            run = cls.open(path)
            for key, value in (("model", model), ("dataset", dataset)):
                if run.manifest[key] != value:
                    raise AdagError(
                        f"{path} already holds a run with a different {key}; "
                        "choose another output directory or delete this one"
                    )
            return run
        if path.exists() and any(path.iterdir()):
            raise AdagError(f"{path} exists, is not empty and is not an adag run; choose another directory")
        manifest = {
            "adag_version": __version__,
            "format_version": FORMAT_VERSION,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "model": model,
            "dataset": dataset,
            "config": {},
            "stages": {},
        }
        run = cls(path, manifest)
        run._save_manifest()
        return run

    @classmethod
    def open(cls, path: str | Path) -> RunDir:
        path = Path(path)
        manifest_path = path / MANIFEST
        if not manifest_path.is_file():
            raise AdagError(f"{path} is not an adag run directory (no {MANIFEST}); create one with `adag trace`")
        try:
            manifest = json.loads(manifest_path.read_text())
        except json.JSONDecodeError:
            raise AdagError(f"{manifest_path} is not valid JSON; the run directory is damaged") from None
        version = manifest.get("format_version") if isinstance(manifest, dict) else None
        if version != FORMAT_VERSION:
            raise AdagError(
                f"{path} was written in run format {version} (adag {manifest.get('adag_version', '?')}); "
                f"this adag {__version__} reads format {FORMAT_VERSION}; rerun the stages with this version"
            )
        return cls(path, manifest)

    def _save_manifest(self) -> None:
        atomic_write_bytes(self.path / MANIFEST, json.dumps(self.manifest, indent=2).encode())

    # stages

    def stage_config(self, stage: str) -> dict[str, Any] | None:
        return self.manifest["config"].get(stage)

    def begin_stage(self, stage: str, config: dict[str, Any], resume: bool = True) -> bool:
        """Record a stage's config. Returns True if finished parts of an identical earlier attempt
        can be kept; otherwise the stage's outputs are cleared. Either way the outputs of later
        stages, which were computed from this stage's, are cleared."""
        same = self.manifest["config"].get(stage) == config
        later = PIPELINE[PIPELINE.index(stage) + 1:] if stage in PIPELINE else ()
        for name in ([] if same and resume else [stage]) + list(later):
            self.clear_stage(name)
            self.manifest["config"].pop(name, None)
            self.manifest["stages"].pop(name, None)
        (self.path / "report.html").unlink(missing_ok=True)
        self.manifest["config"][stage] = config
        self.manifest["stages"][stage] = {"status": "running", "started": time.time()}
        self._save_manifest()
        return same and resume

    def finish_stage(self, stage: str, **facts: Any) -> None:
        entry = self.manifest["stages"][stage]
        entry.update(status="done", seconds=round(time.time() - entry["started"], 2), **facts)
        self._save_manifest()

    def stage_done(self, stage: str) -> bool:
        return self.manifest["stages"].get(stage, {}).get("status") == "done"

    def require_stage(self, stage: str, command: str) -> None:
        if not self.stage_done(stage):
            raise AdagError(f"{self.path} has no finished '{stage}' stage; run `{command}` first")

    def clear_stage(self, stage: str) -> None:
        folder = self.path / stage
        if folder.exists():
            for file in sorted(folder.rglob("*"), reverse=True):
                file.unlink() if file.is_file() else file.rmdir()

    # tables

    def table_path(self, stage: str, name: str) -> Path:
        return self.path / stage / f"{name}.parquet"

    def write_table(self, stage: str, name: str, table: pd.DataFrame | pa.Table) -> Path:
        return self._write(self.table_path(stage, name), table)

    def write_part(self, stage: str, name: str, part: int, table: pd.DataFrame | pa.Table) -> Path:
        return self._write(self.path / stage / name / f"part-{part:06d}.parquet", table)

    def has_part(self, stage: str, name: str, part: int) -> bool:
        return (self.path / stage / name / f"part-{part:06d}.parquet").exists()

    def read_table(self, stage: str, name: str, columns: list[str] | None = None) -> pd.DataFrame:
        """A table written whole or in parts."""
        single = self.table_path(stage, name)
        parts = self.path / stage / name
        if single.exists():
            return pq.read_table(single, columns=columns).to_pandas()
        if parts.is_dir():
            files = sorted(parts.glob("part-*.parquet"))
            if files:
                return pa.concat_tables(pq.read_table(f, columns=columns) for f in files).to_pandas()
        raise AdagError(f"{self.path} has no table '{stage}/{name}'; run the '{stage}' stage first")

    def _write(self, path: Path, table: pd.DataFrame | pa.Table) -> Path:
        if isinstance(table, pd.DataFrame):
            table = pa.Table.from_pandas(table, preserve_index=False)
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd")
        atomic_write_bytes(path, sink.getvalue().to_pybytes())
        return path

    def write_json(self, stage: str, name: str, data: Any) -> None:
        atomic_write_bytes(self.path / stage / f"{name}.json", json.dumps(data, indent=2).encode())

    def read_json(self, stage: str, name: str) -> Any:
        return json.loads((self.path / stage / f"{name}.json").read_text())

