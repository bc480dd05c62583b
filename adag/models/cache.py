"""The one directory where adag keeps what it derives once: converted built-in models and the LLM cache."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """$ADAG_CACHE, else ~/.cache/adag."""
    return Path(os.environ.get("ADAG_CACHE", Path.home() / ".cache" / "adag"))
