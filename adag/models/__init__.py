"""Models: the built-in registry, loading (built-in, local, hub) and one adapter per model family."""

from adag.models.families import ADAPTERS, FamilyAdapter, NormKind, adapter_for
from adag.models.loading import LoadedModel, load_model, run_model
from adag.models.registry import BUILTIN_MODELS

__all__ = ["ADAPTERS", "BUILTIN_MODELS", "FamilyAdapter", "LoadedModel", "NormKind", "adapter_for", "load_model",
           "run_model"]
