"""Input profiles in forward mode: the linearised model pushed forward on tangent rows.

The linearised model is linear in the input embeddings once every nonlinear coefficient is frozen
(norm scales, attention queries and keys, activation ratios, the half rule's gate and up factors)
and every bias is removed. So a node's input profile numerator at source position j,
`e_j . d a_n / d e_j`, is simply the node's value in that linear model when the input is e_j alone
(at position j, zero elsewhere). One tangent row per source position gives every kept node's
entry for that position at once: T rows of T tokens, against one backward row per kept node.

A tangent forward is the model's own forward pass (so every family's attention, masking and
position handling is reused as it is) with hooks that replace each nonlinearity by its frozen
linear version, and with zero biases passed through `torch.func.functional_call` (the model's
parameters are never touched). Tangent row s * B + b carries source position j0 + s of prompt b,
so the (B, T, ...) constants of the base pass broadcast over the leading S axis without copies.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, suppress

import torch
from torch import nn
from torch.func import functional_call

from adag.models import LoadedModel
from adag.models.families import FamilyAdapter
from adag.trace.rules import FrozenValues, Hook, TangentRows, hooks_installed, layer_names, rule_set
from adag.trace.tap import NodeIndex


class _TopLayerDone(Exception):
    """Raised once the highest layer with kept nodes has been read: later layers are not needed."""


def tangent_input_profiles(lm: LoadedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                           position_ids: torch.Tensor, embeddings: torch.Tensor, frozen: FrozenValues,
                           nodes: dict[int, NodeIndex], node_count: int, sources_per_pass: int,
                           cut: bool = False) -> torch.Tensor:
    """(K, T) numerators e_j . d a_n / d e_j for the nodes in `nodes` ({layer: index}, node order
    = layers ascending, then index order), from the constants `frozen` of a half-rule pass over
    `embeddings` (B, T, d). With `cut`, every MLP output is held constant (direct effects)."""
    batch, width = input_ids.shape
    result = embeddings.new_zeros(node_count, width)
    starts = {}
    offset = 0
    for layer, index in nodes.items():
        starts[layer] = offset
        offset += len(index[0])
    source_embeddings = embeddings * attention_mask[..., None].to(embeddings.dtype)  # padding is no source
    zero_biases = {name: torch.zeros_like(p) for name, p in lm.model.named_parameters() if name.endswith("bias")}
    for first in range(0, width, sources_per_pass):
        sources = min(sources_per_pass, width - first)
        tangent = embeddings.new_zeros(sources, batch, width, embeddings.shape[-1])
        positions = torch.arange(first, first + sources, device=embeddings.device)
        tangent[torch.arange(sources), :, positions] = source_embeddings[:, positions].transpose(0, 1)
        tangent = tangent.flatten(0, 1)
        read: dict[int, torch.Tensor] = {}
        inputs = dict(input_ids=input_ids.repeat(sources, 1), attention_mask=attention_mask.repeat(sources, 1),
                      position_ids=position_ids.repeat(sources, 1), logits_to_keep=1, use_cache=False)
        with torch.no_grad(), _tangent_rules(lm.model, lm.adapter, frozen, sources, tangent, nodes, read, cut), \
                suppress(_TopLayerDone):
            functional_call(lm.model, zero_biases, kwargs=inputs)
        for layer, values in read.items():
            result[starts[layer]:starts[layer] + values.shape[1], first:first + sources] = values.T
    return result


@contextmanager
def _tangent_rules(model: nn.Module, adapter: FamilyAdapter, frozen: FrozenValues, sources: int,
                   tangent: torch.Tensor, nodes: dict[int, NodeIndex], read: dict[int, torch.Tensor],
                   cut: bool) -> Iterator[None]:
    """The half rule set's tangent hooks, then a tap that feeds `tangent` in and reads the nodes'
    values at the MLP output projections' inputs (after the half rule rewrote them)."""
    rows = TangentRows(sources)

    def embeddings(_m: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if args:
            return (tangent, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": tangent}

    top = max(nodes) if nodes else -1

    def mlp_out(layer: int):
        def hook(_m: nn.Module, args: tuple) -> tuple:
            value = rows.split(args[0])
            if layer in nodes:
                row, position, neuron = nodes[layer]
                read[layer] = value[:, row, position, neuron]  # (S, K_layer)
            if layer == top:
                raise _TopLayerDone
            return (torch.zeros_like(args[0]) if cut else args[0], *args[1:])
        return hook

    rules = [hook for rule in rule_set("half") for hook in rule.tangent_hooks(model, adapter, frozen, rows)]
    tap = [Hook(f"{adapter.layers}.0", embeddings, pre=True, with_kwargs=True)]
    tap += [Hook(name, mlp_out(layer), pre=True)
            for layer, name in enumerate(layer_names(model, adapter, adapter.mlp_out))]
    with hooks_installed(model, [*rules, *tap]):
        yield
