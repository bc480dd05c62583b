"""A built-in model's GGUF, joined from its chunks and hash-checked, converted once into the cache as a
plain safetensors checkpoint (transformers dequantises GGUF weights to float32 on load)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from adag.models.cache import cache_dir
from adag.models.packages import check_installed, package_directory, raise_damaged, sha256_of
from adag.models.registry import BuiltinModel


def builtin_directory(name: str, builtin: BuiltinModel) -> Path:
    """The converted safetensors copy of a built-in model, converting the GGUF once."""
    target = cache_dir() / "models" / name
    if (target / "config.json").exists():
        return target
    check_installed(name, builtin.packages)
    staging = target.with_name(f".{name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        started = time.perf_counter()
        gguf = gguf_file(builtin, staging)
        convert(gguf, staging)
        if gguf.parent == staging:  # an assembled GGUF is only needed for the conversion
            gguf.unlink()
        (staging / "adag-source.json").write_text(json.dumps(
            {"packages": list(builtin.packages), "sha256": builtin.sha256,
             "converted_in_s": round(time.perf_counter() - started, 1)}))
        target.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(OSError):  # another process converted it first
            staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def gguf_file(builtin: BuiltinModel, workdir: Path) -> Path:
    """The model's GGUF, checked against its pinned SHA-256: the file inside its package, or its chunks
    joined into `workdir`. A missing or altered file names the package to reinstall."""
    parts = [package_directory(package) / relative for package, relative in builtin.gguf]
    if not all(part.is_file() for part in parts):
        raise_damaged(builtin.packages)
    if len(parts) == 1:
        path, digest = parts[0], sha256_of(parts[0])
    else:
        path, digest = workdir / "model.gguf", hashlib.sha256()
        with path.open("wb") as out:
            for part in parts:
                with part.open("rb") as f:
                    while block := f.read(1 << 22):
                        digest.update(block)
                        out.write(block)
    if digest.hexdigest() != builtin.sha256:
        raise_damaged(builtin.packages)
    return path


def convert(gguf: Path, directory: Path) -> None:
    """Save the GGUF's tokenizer and its weights, dequantised to float32, as a checkpoint in `directory`."""
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are already plain float32; without the quantizer marker save_pretrained writes them.
    del model.config.quantization_config
    model.hf_quantizer = None
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
