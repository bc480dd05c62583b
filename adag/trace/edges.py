"""Phase 3 of a trace: direct edges into every kept neuron and every target logit."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from adag.models import LoadedModel
from adag.trace.batch import Nodes, PromptBatch
from adag.trace.config import TraceConfig
from adag.trace.metric import at_least_float32
from adag.trace.passes import (
    linearised_pass,
    logit_vjps,
    node_readouts,
    node_vjps,
    readouts_by_layer,
)
from adag.trace.profiles import Profiles
from adag.trace.tangent import BasePass, Injections, Reads, plan_windows, push_forward
from adag.trace.tap import neuron_directions

NEURON, EMBEDDING, LOGIT = 0, 1, 2  # node kinds in Edges.source_kind / target_kind


@dataclass
class Edges:
    """Direct edges of one batch, kept where |weight| >= the edge threshold.

    Sources are kept neurons (index into the batch's `Nodes`) or kept embedding nodes (index into
    the profiles' `embedding_nodes`); targets are kept neurons or target logits (rank in the
    metric's targets).
    """

    row: torch.Tensor  # (edges,) batch row
    source_kind: torch.Tensor
    source: torch.Tensor
    target_kind: torch.Tensor
    target: torch.Tensor
    weight: torch.Tensor
    attribution: torch.Tensor  # weight * RelP_target, or weight * c_i * logit_i for a logit target

    def __len__(self) -> int:
        return len(self.row)


def edges_pass(lm: LoadedModel, config: TraceConfig, batch: PromptBatch, profiles: Profiles,
               method: Literal["forward", "vjp"] | None = None) -> Edges:
    """Direct edges into every kept neuron and every target logit, from kept neurons and embeddings.

    "forward" (the default under linearising rules): one tangent row per source through the profiles'
    linearised pass with every MLP output held. "vjp" (the only choice under plain gradients): a cut
    forward pass of its own, one backward row per target neuron and k from the target logits."""
    method = method or ("vjp" if profiles.base is None else "forward")
    nodes = profiles.nodes
    sources = EdgeSources.of(profiles)
    eps = _edge_eps(profiles.activation, nodes)

    def kept(source: torch.Tensor, target: torch.Tensor, derivative: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The edges among (source, target) pairs, each of one prompt: weight = source factor *
        d target / d source / a_t, kept where the source lies below the target and |weight| >= threshold."""
        a_t = profiles.activation[target]
        weight = derivative * sources.factor[source] / (a_t + eps[target] * torch.where(a_t < 0, -1.0, 1.0))
        keep = (sources.layer[source] < nodes.layer[target]) & (weight.abs() >= config.edge_threshold)
        s, t, w = source[keep], target[keep], weight[keep]
        return (sources.row[s], sources.kind[s], sources.index[s], torch.full_like(t, NEURON), t, w,
                w * profiles.attribution[t])

    if method == "forward":
        parts, to_logits, logits = _forward_derivatives(lm, config, profiles.base, sources, nodes, kept)
    else:
        parts, to_logits, logits = _vjp_derivatives(lm, config, batch, sources, nodes, kept)
    weight = to_logits * sources.factor[:, None] / logits[sources.row]  # (sources, k)
    s, rank = (weight.abs() >= config.edge_threshold).nonzero(as_tuple=True)
    signed_logits = logits * profiles.targets.coeffs.to(weight.dtype)
    parts.append((sources.row[s], sources.kind[s], sources.index[s], torch.full_like(s, LOGIT), rank,
                  weight[s, rank], weight[s, rank] * signed_logits[sources.row[s], rank]))
    return Edges(*(torch.cat(column) for column in zip(*parts)))


@dataclass
class EdgeSources:
    """An edge's possible sources: kept neurons, then kept embedding nodes. Each has a prompt row, a
    position, a layer (embeddings: -1, below every neuron) and a numerator factor (a_s for neurons;
    an embedding probe's gradient already includes e_j)."""

    row: torch.Tensor
    position: torch.Tensor
    layer: torch.Tensor
    kind: torch.Tensor  # NEURON or EMBEDDING
    index: torch.Tensor  # into the nodes or the embedding nodes
    factor: torch.Tensor

    @classmethod
    def of(cls, profiles: Profiles) -> EdgeSources:
        nodes, embedding = profiles.nodes, profiles.embedding_nodes
        return cls(torch.cat([nodes.row, embedding.row]), torch.cat([nodes.position, embedding.position]),
                   torch.cat([nodes.layer, torch.full_like(embedding.row, -1)]),
                   torch.cat([torch.full_like(nodes.row, NEURON), torch.full_like(embedding.row, EMBEDDING)]),
                   torch.cat([torch.arange(len(nodes)), torch.arange(len(embedding))]).to(nodes.row),
                   torch.cat([profiles.activation, profiles.activation.new_ones(len(embedding))]))

    def __len__(self) -> int:
        return len(self.row)


def _forward_derivatives(lm: LoadedModel, config: TraceConfig, base: BasePass, sources: EdgeSources, nodes: Nodes,
                         kept: Callable) -> tuple[list, torch.Tensor, torch.Tensor]:
    """`kept` of each chunk of (source, target, d target / d source) over the pairs of a prompt,
    d logit_i / d source (sources, k) and the target logits (B, k), from tangent passes of the cut
    model: row s * B + b carries prompt b's source of rank s, latest position first, so that late
    sources share narrow windows."""
    batch = base.batch
    order = torch.from_numpy(np.lexsort([sources.layer.cpu().numpy(), -sources.position.cpu().numpy(),
                                         sources.row.cpu().numpy()])).to(sources.row.device)
    counts = torch.bincount(sources.row[order], minlength=len(batch.valid))
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order), device=order.device) - (counts.cumsum(0) - counts)[sources.row[order]]
    slots = int(rank.max()) + 1 if len(rank) else 0
    source_at = torch.full((slots, len(batch.valid)), -1, dtype=torch.long, device=rank.device)
    source_at[rank, sources.row] = torch.arange(len(sources), device=rank.device)
    earliest = source_at.new_full((slots,), batch.input_ids.shape[1]).scatter_reduce(0, rank, sources.position, "amin")
    embeddings = base.linear_pass.tap.embeddings.detach()
    vectors = embeddings[sources.row, sources.position].clone()
    outputs = lm.adapter.per_layer(lm.model, lm.adapter.mlp_out)
    for layer, (_, _, neuron) in nodes.by_layer().items():
        vectors[(sources.kind == NEURON) & (sources.layer == layer)] = \
            neuron_directions(outputs[layer])[neuron].to(vectors)
    reads = Reads(nodes.by_layer(), readouts_by_layer(node_readouts(lm, config, base.linear_pass, nodes), nodes),
                  base.logit_readouts(lm))
    plan = plan_windows(lm, config, base, earliest.tolist(), cut=True)
    parts, to_logits = [], embeddings.new_zeros(len(sources), reads.logits.shape[1])
    for window in plan:
        members = ((rank >= window.first) & (rank < window.stop)).nonzero(as_tuple=True)[0]
        slot = rank[members] - window.first
        injections = Injections(slot, sources.row[members], sources.layer[members], sources.position[members],
                                vectors[members])
        read = push_forward(lm, base, window, injections, reads, cut=True)
        values = torch.cat([read[layer] for layer in reads.nodes], dim=1)  # (S, K)
        source = source_at[window.first:window.stop, nodes.row]  # (S, K): the source each target pairs with in row s
        s, t = (source >= 0).nonzero(as_tuple=True)
        parts.append(kept(source[s, t], t, at_least_float32(values[s, t])))
        to_logits[members] = read["logits"][slot, sources.row[members]]
    return parts, at_least_float32(to_logits), base.linear_pass.target_logits.detach()


def _vjp_derivatives(lm: LoadedModel, config: TraceConfig, batch: PromptBatch, sources: EdgeSources, nodes: Nodes,
                     kept: Callable) -> tuple[list, torch.Tensor, torch.Tensor]:
    """As `_forward_derivatives`, from a cut forward pass with probes and batched backward rows of it,
    one per target (`adag.trace.passes.node_vjps`), and k from the target logits."""
    cut_pass = linearised_pass(lm, config, batch, nodes, cut=True)
    embedding = sources.kind == EMBEDDING
    parts = []
    for members, slot, to_embedding_rows, to_node_rows in node_vjps(lm, cut_pass, nodes, list(nodes.by_layer()),
                                                                    config, to_nodes=True):
        target_at = torch.full((len(to_node_rows), len(batch.valid)), -1, dtype=torch.long, device=slot.device)
        target_at[slot, nodes.row[members]] = members
        target = target_at[:, sources.row]  # (C, sources): the target each source pairs with in row c
        from_embeddings = to_embedding_rows[:, sources.row[embedding], sources.position[embedding]]
        derivatives = torch.cat([to_node_rows, from_embeddings], dim=1)
        c, s = (target >= 0).nonzero(as_tuple=True)
        parts.append(kept(s, target[c, s], derivatives[c, s]))
    to_nodes, to_embeddings = logit_vjps(cut_pass, nodes, keep_graph=False)  # (K, k), (B, T, k)
    to_logits = torch.cat([to_nodes, to_embeddings[sources.row[embedding], sources.position[embedding]]])
    return parts, to_logits, cut_pass.target_logits.detach()


def _edge_eps(activation: torch.Tensor, nodes: Nodes) -> torch.Tensor:
    """1e-6 * mean |a| over the kept nodes of each node's prompt."""
    rows = int(nodes.row.max()) + 1 if len(nodes) else 0
    total = activation.new_zeros(rows).index_add_(0, nodes.row, activation.abs())
    count = activation.new_zeros(rows).index_add_(0, nodes.row, torch.ones_like(activation))
    return 1e-6 * (total / count.clamp_min(1))[nodes.row]
