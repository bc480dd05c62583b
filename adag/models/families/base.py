"""What the attribution code needs to know about one model family, as module paths."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

from torch import nn


class NormKind(Enum):
    """How a family's norm computes its output, so its scale can be frozen exactly."""

    RMS = "rms"  # weight * x / rms(x)
    RMS_PLUS_ONE = "rms_plus_one"  # (1 + weight) * x / rms(x)  (Gemma)
    LAYER = "layer"  # weight * (x - mean) / std(x) + bias


@dataclass(frozen=True)
class FamilyAdapter:
    """Where a family keeps its parts. Paths are dotted attribute names.

    `layers` is relative to the model; every other per-layer path is relative to one layer.
    The neuron activation is the input of `mlp_out`. Gated MLPs name `mlp_up` (the product
    `act(gate) * up` feeds `mlp_out`); non-gated MLPs leave it None. Attention takes its queries and keys
    from `attention_query_key` and its values from `attention_value`, or all three from
    `attention_fused_qkv`; `attention_out` projects the heads' outputs (its input: heads side by side).
    """

    model_types: tuple[str, ...]
    layers: str
    mlp_act: str
    mlp_out: str
    norms: tuple[str, ...]
    final_norm: str
    unembedding: str
    norm_kind: NormKind
    attention_out: str
    attention_query_key: tuple[str, ...] = ()
    attention_value: str | None = None
    attention_fused_qkv: str | None = None
    mlp_up: str | None = None

    @property
    def gated(self) -> bool:
        return self.mlp_up is not None

    def layer_list(self, model: nn.Module) -> Sequence[nn.Module]:
        return model.get_submodule(self.layers)

    def neuron_count(self, model: nn.Module) -> int:
        out = self.layer_list(model)[0].get_submodule(self.mlp_out)
        return out.in_features if hasattr(out, "in_features") else out.weight.shape[0]

    def per_layer(self, model: nn.Module, path: str) -> list[nn.Module]:
        return [layer.get_submodule(path) for layer in self.layer_list(model)]

    def norm_modules(self, model: nn.Module) -> list[nn.Module]:
        per_layer = [layer.get_submodule(p) for layer in self.layer_list(model) for p in self.norms]
        return [*per_layer, model.get_submodule(self.final_norm)]

    def logit_softcap(self, model: nn.Module) -> float | None:
        return getattr(model.config, "final_logit_softcapping", None)
