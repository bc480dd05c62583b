"""Models named by a Hugging Face hub id (org/name), downloaded once into the hub's own cache."""

from __future__ import annotations

from pathlib import Path

from adag.errors import AdagError


def looks_like_hub_id(spec: str) -> bool:
    parts = spec.split("/")
    return len(parts) == 2 and all(parts) and not spec.startswith((".", "/", "~"))


def hub_directory(spec: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(spec, allow_patterns=["*.json", "*.safetensors", "*.model", "*.jinja"]))
    except Exception as error:
        raise AdagError(
            f"could not get model '{spec}' from the Hugging Face hub ({type(error).__name__}); "
            "check the id and your network, or download it once and pass the local directory"
        ) from None
