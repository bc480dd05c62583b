"""Interventions on half-neurons, installed as hooks for the duration of a `with` block by the installer
that installs every hook of adag (`hooks_installed`): a tap entered inside reads the steered values."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from adag.half_neurons import HalfNeuron, positive_half
from adag.models import FamilyAdapter
from adag.trace.rules import Hook, hooks_installed, layer_names


@contextmanager
def scaled(model: nn.Module, adapter: FamilyAdapter, half_neurons: list[HalfNeuron], multiplier: float,
           positions: torch.Tensor | None = None) -> Iterator[None]:
    """Multiply the listed half-neurons' activations by `multiplier` (0 ablates, 2 amplifies, negative flips).

    A half-neuron is scaled only where its activation has its polarity. `positions` (B, T bool) limits
    the intervention to those positions, e.g. the traced ones; None means all positions.
    """
    n_neurons = adapter.neuron_count(model)
    masks: dict[int, torch.Tensor] = defaultdict(lambda: torch.zeros(2, n_neurons, dtype=torch.bool))
    for layer, neuron, polarity in half_neurons:
        masks[int(layer)][0 if polarity > 0 else 1, int(neuron)] = True

    def hook(positive: torch.Tensor, negative: torch.Tensor):
        def scale(_module: nn.Module, args: tuple) -> tuple:
            activation = args[0]
            match = torch.where(positive_half(activation), positive.to(activation.device),
                                negative.to(activation.device))
            if positions is not None:
                match = match & positions.to(activation.device)[..., None]
            return (torch.where(match, activation * multiplier, activation), *args[1:])
        return scale

    names = layer_names(model, adapter, adapter.mlp_out)
    with hooks_installed(model, [Hook(names[layer], hook(*mask), pre=True) for layer, mask in masks.items()]):
        yield


@contextmanager
def replaced(model: nn.Module, adapter: FamilyAdapter, keep: dict[int, torch.Tensor],
             baseline: dict[int, torch.Tensor]) -> Iterator[None]:
    """Keep activations where `keep[l]` (B, T, N bool) is set and replace the rest with `baseline[l]`
    (broadcastable to (B, T, N): zeros for zero-ablation, dataset means for mean-ablation)."""

    def hook(mask: torch.Tensor, base: torch.Tensor):
        def replace(_module: nn.Module, args: tuple) -> tuple:
            activation = args[0]
            return (torch.where(mask.to(activation.device), activation, base.to(activation)), *args[1:])
        return replace

    names = layer_names(model, adapter, adapter.mlp_out)
    with hooks_installed(model, [Hook(names[layer], hook(mask, baseline[layer]), pre=True)
                                 for layer, mask in keep.items()]):
        yield
