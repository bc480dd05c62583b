"""Interventions on half-neurons, installed as hooks for the duration of a `with` block."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import torch
from torch import nn

from adag.half_neurons import HalfNeuron, positive_half
from adag.models import FamilyAdapter


@contextmanager
def scaled(model: nn.Module, adapter: FamilyAdapter, half_neurons: list[HalfNeuron], multiplier: float,
           positions: torch.Tensor | None = None) -> Iterator[None]:
    """Multiply the listed half-neurons' activations by `multiplier` (0 ablates, 2 amplifies, negative flips).

    A half-neuron is scaled only where its activation has its polarity. `positions` (B, T bool) limits
    the intervention to those positions, e.g. the traced ones; None means all positions.
    """
    layers = adapter.layer_list(model)
    n_neurons = adapter.neuron_count(model)
    masks: dict[int, torch.Tensor] = defaultdict(lambda: torch.zeros(2, n_neurons, dtype=torch.bool))
    for layer, neuron, polarity in half_neurons:
        masks[int(layer)][0 if polarity > 0 else 1, int(neuron)] = True
    with ExitStack() as stack:
        for layer, (positive, negative) in masks.items():
            def hook(_module: nn.Module, args: tuple, positive=positive, negative=negative) -> tuple:
                activation = args[0]
                match = torch.where(positive_half(activation), positive.to(activation.device),
                                    negative.to(activation.device))
                if positions is not None:
                    match = match & positions.to(activation.device)[..., None]
                return (torch.where(match, activation * multiplier, activation), *args[1:])

            handle = layers[layer].get_submodule(adapter.mlp_out).register_forward_pre_hook(hook)
            stack.callback(handle.remove)
        yield


@contextmanager
def replaced(model: nn.Module, adapter: FamilyAdapter, keep: dict[int, torch.Tensor],
             baseline: dict[int, torch.Tensor]) -> Iterator[None]:
    """Keep activations where `keep[l]` (B, T, N bool) is set and replace the rest with `baseline[l]`
    (broadcastable to (B, T, N): zeros for zero-ablation, dataset means for mean-ablation)."""
    layers = adapter.layer_list(model)
    with ExitStack() as stack:
        for layer, mask in keep.items():
            def hook(_module: nn.Module, args: tuple, mask=mask, base=baseline[layer]) -> tuple:
                activation = args[0]
                kept = torch.where(mask.to(activation.device), activation, base.to(activation))
                return (kept, *args[1:])

            handle = layers[layer].get_submodule(adapter.mlp_out).register_forward_pre_hook(hook)
            stack.callback(handle.remove)
        yield
