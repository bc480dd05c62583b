"""Checks of a local model directory before any weight is read, each failing with a one-line AdagError,
and a cheap fingerprint of the weights found there."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from huggingface_hub.errors import StrictDataclassError
from safetensors import SafetensorError, safe_open
from transformers import AutoConfig, PretrainedConfig

from adag.errors import AdagError


def read_config(directory: Path) -> PretrainedConfig:
    """The model's config.json, checked to be a JSON object naming a model family."""
    path = directory / "config.json"
    if not path.is_file():
        raise AdagError(f"{directory} has no config.json, so it is not a Hugging Face model directory; "
                        "point --model at the directory that model.save_pretrained() wrote")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        where = f" (line {error.lineno})" if isinstance(error, json.JSONDecodeError) else ""
        raise AdagError(f"{path} is not valid JSON{where}; restore it from the model's source") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("model_type"), str):
        raise AdagError(f"{path} has no 'model_type'; restore it from the model's source")
    try:
        return AutoConfig.from_pretrained(directory)
    except (ValueError, KeyError, TypeError, StrictDataclassError) as error:
        raise AdagError(f"{path} is not a valid config: {one_line(error)}; fix it or restore it from the model's "
                        "source") from None


def weight_files(directory: Path) -> list[Path]:
    """The directory's safetensors files, each checked to be whole (header and size agree).

    Pickled PyTorch weights (*.bin) are never loaded: unpickling can run arbitrary code.
    """
    files = sorted(directory.glob("*.safetensors"))
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError):
            raise AdagError(f"{index} is not a valid safetensors index; restore it from the model's source") from None
        missing = sorted(shard for shard in shards if not (directory / shard).is_file())
        if missing:
            raise AdagError(f"{directory} lacks the weight shard {missing[0]} named in {index.name}; "
                            "download the model again")
    if not files:
        pickled = [p.name for p in directory.glob("*.bin")]
        found = f" (only pickled {pickled[0]}, which adag does not load)" if pickled else ""
        raise AdagError(f"{directory} has config.json but no *.safetensors weights{found}; save the model "
                        "with model.save_pretrained(directory), which writes safetensors")
    for path in files:
        try:
            with safe_open(path, "pt"):
                pass
        except (SafetensorError, OSError) as error:
            raise AdagError(f"{path} is damaged ({first_line(error)}); download or save the model again") from None
    return files


def weights_fingerprint(files: list[Path], config_file: Path) -> str:
    """A cheap, stable hash of what is loaded: the config and the safetensors files' headers and sizes.

    Headers name every tensor with its dtype, shape and byte range; with the sizes this tells
    checkpoints apart without reading gigabytes. Loading refuses tensors the config does not use, so
    the files hold exactly the loaded tensors; the config says how they are put together.
    """
    config = json.loads(config_file.read_text(encoding="utf-8"))
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    for path in sorted(files):
        with path.open("rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            digest.update(path.name.encode())
            digest.update(f.read(header_len))
        digest.update(str(path.stat().st_size).encode())
    return digest.hexdigest()[:16]


def one_line(error: Exception, limit: int = 300) -> str:
    """A multi-line library message (e.g. a config validation error) as one line, shortened."""
    text = " ".join(line.strip() for line in str(error).splitlines() if line.strip()) or type(error).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
