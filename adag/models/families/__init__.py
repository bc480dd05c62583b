"""One adapter per model family, picked by `config.model_type`."""

from __future__ import annotations

from adag.errors import AdagError
from adag.models.families import gemma2, gemma3, gpt2, llama, mistral, qwen2, qwen3
from adag.models.families.base import FamilyAdapter, NormKind

ADAPTERS: dict[str, FamilyAdapter] = {
    model_type: module.ADAPTER
    for module in (llama, mistral, qwen2, qwen3, gemma2, gemma3, gpt2)
    for model_type in module.ADAPTER.model_types
}


def adapter_for(model_type: str) -> FamilyAdapter:
    """The adapter for a `config.model_type`, or a clear error listing the supported families."""
    try:
        return ADAPTERS[model_type]
    except KeyError:
        supported = ", ".join(sorted(ADAPTERS))
        raise AdagError(
            f"model family '{model_type}' is not supported; supported families: {supported}"
        ) from None


__all__ = ["ADAPTERS", "FamilyAdapter", "NormKind", "adapter_for"]
