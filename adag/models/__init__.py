"""Models: loading (built-in, local, hub) and one adapter per model family."""

from adag.models.families import ADAPTERS, FamilyAdapter, NormKind, adapter_for
from adag.models.loading import BUILTIN_MODELS, LoadedModel, load_model, run_model

__all__ = ["ADAPTERS", "BUILTIN_MODELS", "FamilyAdapter", "LoadedModel", "NormKind", "adapter_for", "load_model",
           "run_model"]
