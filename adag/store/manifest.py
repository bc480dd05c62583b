"""The manifest of a run (RUN/manifest.json): its format, checked when read."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from adag.errors import AdagError, parse_json, unreadable
from adag.version import __version__

FORMAT_VERSION = 3  # 2: staged stages and file records; 3: trace embeddings table, direct embedding edges
MANIFEST = "manifest.json"
STAGING = ".staging"
MANIFEST_KEYS = {"adag_version": str, "format_version": int, "created": str, "model": dict, "dataset": dict,
                 "stages": dict}
ENTRY_KEYS = ("status", "id", "config", "inputs", "files", "command", "started", "seconds")


def new_manifest(model: dict[str, Any], dataset: dict[str, Any]) -> dict[str, Any]:
    """The manifest of a run with no stages yet."""
    return {
        "adag_version": __version__,
        "format_version": FORMAT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model": model,
        "dataset": dataset,
        "stages": {},
    }


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
    try:
        if not manifest_path.is_file():
            raise AdagError(f"{path} is not an adag run directory (no {MANIFEST}); create one with `adag trace`")
        text = manifest_path.read_bytes()
    except OSError as error:
        raise unreadable(manifest_path, error) from None
    try:
        manifest = parse_json(text)
    except ValueError as error:  # also bytes that are not UTF-8
        reason = f" ({error})" if "nested" in str(error) else ""
        raise AdagError(f"{manifest_path} is not valid JSON{reason}; the run directory is damaged") from None
    if not isinstance(manifest, dict):
        raise AdagError(f"{manifest_path} holds a JSON {type(manifest).__name__}, not an object; "
                        "the run directory is damaged")
    version = manifest.get("format_version")
    if type(version) is not int:
        raise AdagError(f"{manifest_path}: format_version is {json.dumps(version)[:40]}, not a number; "
                        "the run directory is damaged")
    if version != FORMAT_VERSION:
        raise AdagError(
            f"{path} was written in run format {version} (adag {manifest.get('adag_version', '?')}); "
            f"this adag {__version__} reads format {FORMAT_VERSION}; rerun the stages with this version"
        )
    for key, kind in MANIFEST_KEYS.items():
        if not isinstance(manifest.get(key), kind):
            raise AdagError(f"{manifest_path} lacks '{key}' (or it is not a {kind.__name__}); "
                            "the run directory is damaged")
    pending = manifest.get("pending")
    if pending is not None and not (isinstance(pending, dict) and isinstance(pending.get("stage"), str)
                                    and _entry_shape(pending.get("entry"))):
        raise AdagError(f"{manifest_path}: the record of an interrupted commit ('pending') is damaged; "
                        "the run directory is damaged")
    for stage, entry in manifest["stages"].items():
        if not isinstance(stage, str) or not _entry_shape(entry):
            raise AdagError(f"{manifest_path}: the entry of stage '{stage}' is damaged; "
                            f"rerun `adag {stage}` into a new run directory")
    return manifest


def _entry_shape(entry: Any) -> bool:
    """Whether a stage's entry has what readers rely on: a config and inputs, and a size and SHA-256 for
    each file, named inside the stage's folder."""
    if not isinstance(entry, dict) or not all(key in entry for key in ("id", "config", "inputs", "files")):
        return False
    files = entry["files"]
    return (isinstance(entry["config"], dict) and isinstance(entry["inputs"], dict) and isinstance(files, dict)
            and all(_file_record_shape(file, record) for file, record in files.items()))


def _file_record_shape(file: str, record: Any) -> bool:
    return (isinstance(record, dict) and type(record.get("size")) is int and isinstance(record.get("sha256"), str)
            and not Path(file).is_absolute() and ".." not in Path(file).parts)
