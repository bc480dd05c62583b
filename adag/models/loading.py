"""Load a causal LM and its tokenizer from a built-in name, a local directory or a hub id."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from adag.errors import AdagError, broken_link
from adag.models.checks import first_line, read_config, weight_files, weights_fingerprint
from adag.models.families import FamilyAdapter, adapter_for
from adag.models.gguf import builtin_directory
from adag.models.hub import hub_directory, looks_like_hub_id
from adag.models.placement import device_map_for, resolve_device
from adag.models.registry import BUILTIN_MODELS

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
        """Where inputs go: the input embeddings' device (the first of several under a device map)."""
        return self.model.get_input_embeddings().weight.device

    @contextmanager
    def seeded(self, seed: int) -> Iterator[None]:
        """Sample with this seed on a fork of torch's RNG: the global RNG state is restored on exit."""
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            yield


def load_model(spec: str, dtype: str = "float32", device: str = "cpu") -> LoadedModel:
    """Load `spec`: a built-in name (see BUILTIN_MODELS), a local Hugging Face directory or a hub id.

    Every input is checked before weights are read, so a bad one is a one-line AdagError.
    `device="auto"` spreads whole layers over the visible GPUs (see `plan_device_map`).
    """
    if dtype not in DTYPES:
        raise AdagError(f"unknown dtype '{dtype}'; use one of {', '.join(DTYPES)}")
    target = resolve_device(device)
    directory = model_directory(spec)
    config = read_config(directory)
    adapter = adapter_for(config.model_type)
    weights = weight_files(directory)
    model = _load_weights(directory, DTYPES[dtype], device_map_for(target, config, DTYPES[dtype]))
    model.eval().requires_grad_(False)
    fingerprint = weights_fingerprint(weights, directory / "config.json")
    return LoadedModel(spec, model, _load_tokenizer(directory), adapter, fingerprint)


def run_model(traced: dict, spec: str | None = None) -> LoadedModel:
    """A run's model, from `traced` (the run manifest's model: spec and weights), or `spec` instead,
    refusing one whose weights differ from the traced model's."""
    lm = load_model(spec or traced["spec"])
    if lm.weights_hash != traced["weights"]:
        raise AdagError(f"model weights differ from those of the traced model {traced['spec']} ({lm.weights_hash} "
                        f"vs {traced['weights']}); use the traced model")
    return lm


def model_directory(spec: str) -> Path:
    """The local directory for a built-in name, an existing directory or an org/name hub id."""
    if spec in BUILTIN_MODELS:
        return builtin_directory(spec, BUILTIN_MODELS[spec])
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise AdagError(f"model '{spec}' is a file; pass the directory that holds config.json and the weights")
    if problem := broken_link(path):
        raise AdagError(f"model '{spec}': {problem}; pass the model directory itself")
    if looks_like_hub_id(spec):
        return hub_directory(spec)
    builtins = ", ".join(BUILTIN_MODELS)
    if "/" in spec or spec.startswith((".", "~")):
        raise AdagError(f"unknown model '{spec}': no such directory; use a built-in ({builtins}), "
                        "an existing model directory, or a hub id such as org/name")
    raise AdagError(
        f"unknown model '{spec}': not a built-in ({builtins}) or a directory here; hub ids name the "
        "organisation too, as in org/name (e.g. HuggingFaceTB/SmolLM2-135M), or pass a local model directory"
    )


def _load_weights(directory: Path, dtype: torch.dtype, device_map: dict) -> PreTrainedModel:
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            directory, dtype=dtype, device_map=device_map, use_safetensors=True, output_loading_info=True)
    except RuntimeError as error:  # tensors whose shapes differ from what config.json describes
        raise AdagError(f"{directory}: the weights do not fit config.json ({first_line(error)}); "
                        "the checkpoint does not match its config") from None
    missing, unexpected = sorted(info.get("missing_keys") or []), sorted(info.get("unexpected_keys") or [])
    if missing or unexpected:
        example = (unexpected or missing)[0]
        raise AdagError(f"{directory}: config.json and the weights disagree: {len(unexpected)} unexpected and "
                        f"{len(missing)} missing weight tensor(s) (e.g. {example}); restore the config or the "
                        "weights from the model's source")
    return model


def _load_tokenizer(directory: Path) -> object:
    try:
        return AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError, TypeError) as error:
        raise AdagError(f"{directory}: could not load the tokenizer ({first_line(error)}); "
                        "save it next to the model with tokenizer.save_pretrained(directory)") from None
