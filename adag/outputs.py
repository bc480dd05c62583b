"""What adag writes out: text for the terminal (`printable`) and files of its own (`--out`).

Text that comes from models, LLMs and datasets may hold terminal control sequences (colours, a window
title, a bell, NUL); everything the CLI prints goes through `printable`.

A command may write a file of its own (`--out`): anywhere but inside a run directory, whose files
belong to its stages (a report, graph or figure written over them would brick the run).

A path-valued option is declared with `OutputPath` in its settings model, so the CLI and study files
check it the same way before any work starts, and the writers check it again when they write (`write`):
`~` is expanded, symlinks and `..` are resolved before the run check, and an empty path, a directory, a
path under a regular file, a folder without write permission or a file name whose extension is not the
format written are one-line errors. Light on purpose (pydantic only): settings models import it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic_core import PydanticCustomError, core_schema

from adag.errors import AdagError

# An escape sequence: CSI (ESC [ ... final byte), OSC (ESC ] ... BEL or ESC backslash), or a two-byte ESC sequence.
ESCAPE = re.compile(r"\x1b(\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(\x07|\x1b\\)?|[@-_])?")
# C0 and C1 controls but tab and newline; bidi embeddings, overrides, isolates and marks, which reorder what
# follows on the terminal (U+202E shows "gpj.exe" as "exe.jpg"); and lone surrogates, which cannot be printed.
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069\ud800-\udfff]")


def printable(text: object, lines: bool = False) -> str:
    """`text` without escape sequences, control characters and bidi controls; newlines become spaces
    unless `lines`."""
    text = ESCAPE.sub("", str(text))
    if not lines:
        text = text.replace("\n", " ")
    return CONTROL.sub("", text)


@dataclass(frozen=True)
class OutputPath:
    """Marks a settings field as a path that a command writes: a file in one of `formats` (file name
    endings, e.g. (".svg", ".png")), or with `run` a run directory to create or resume, which must not
    lie inside another run."""

    formats: tuple[str, ...] = ()
    run: bool = False

    def __get_pydantic_core_schema__(self, source: Any, handler: Any) -> core_schema.CoreSchema:
        return core_schema.no_info_after_validator_function(self.validate, handler(source))

    def validate(self, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            return str(run_target(value) if self.run else output_file(value, self.formats))
        except AdagError as error:
            raise PydanticCustomError("output_path", "{reason}", {"reason": str(error)}) from None


def output_file(path: str | Path, formats: tuple[str, ...] = ()) -> Path:
    """`path` (with `~` expanded) if a command may write a file there, else an AdagError saying why."""
    target = _expanded(path)
    run = _enclosing_run(target.resolve())
    if run is not None:
        raise AdagError(f"{target} is inside the run directory {run}, whose files belong to its stages; "
                        "write it outside the run")
    if target.is_dir():
        raise AdagError(f"{target} is a directory; give a file name, e.g. {target / ('out' + _first(formats))}")
    if formats and target.suffix.lower() not in formats:
        raise AdagError(f"{target} is not named for the format written; give a file name ending in "
                        f"{', '.join(formats)}")
    _check_writable(target.resolve().parent)
    return target


def run_target(path: str | Path) -> Path:
    """`path` (with `~` expanded) if it can be a run directory: not inside another run."""
    target = _expanded(path)
    resolved = target.resolve()
    run = _enclosing_run(resolved.parent)
    if run is not None:
        raise AdagError(f"{target} is inside the run directory {run}; give a run directory outside any run")
    _check_writable(resolved if resolved.is_dir() else resolved.parent)
    return target


def write(path: str | Path, data: bytes, formats: tuple[str, ...] = ()) -> Path:
    """Write a command's output file whole (checked as `output_file`); a failure is one line."""
    from adag.store import atomic_write_bytes

    target = output_file(path, formats)
    try:
        atomic_write_bytes(target, data)
    except OSError as error:
        raise AdagError(f"cannot write {target} ({error.strerror or error}); choose another --out") from None
    return target


def _expanded(path: str | Path) -> Path:
    if not str(path).strip():
        raise AdagError("the output path is empty; give a file name")
    return Path(path).expanduser()


def _first(formats: tuple[str, ...]) -> str:
    return formats[0] if formats else ""


def _enclosing_run(path: Path) -> Path | None:
    """The run directory that holds `path` (or is `path`), if any."""
    from adag.store import MANIFEST

    for folder in (path, *path.parents):
        if (folder / MANIFEST).is_file():
            return folder
    return None


def _check_writable(folder: Path) -> None:
    """The nearest existing folder of `folder` must be a folder this process may write in."""
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        raise AdagError(f"{existing} is a file, so nothing can be written under it; choose another path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise AdagError(f"no permission to write in {existing}; choose another path")
