"""Phase 3 of a trace: direct edges into every kept neuron and every target logit."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from adag.models import LoadedModel
from adag.trace.batch import Nodes, PromptBatch
from adag.trace.config import TraceConfig
from adag.trace.passes import linearised_pass, logit_vjps, node_vjps
from adag.trace.profiles import Profiles

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


def edges_pass(lm: LoadedModel, config: TraceConfig, batch: PromptBatch, profiles: Profiles) -> Edges:
    """Direct edges into every kept neuron and every target logit, from kept neurons and embeddings."""
    nodes, activation, embedding_nodes = profiles.nodes, profiles.activation, profiles.embedding_nodes
    layers = list(nodes.by_layer())
    cut_pass = linearised_pass(lm, config, batch, nodes, cut=True)
    # Sources: neurons then embedding nodes. Each has a prompt row, a layer (embeddings: -1, below
    # every neuron) and a numerator factor (a_s for neurons; the embedding probe's gradient
    # already includes e_j).
    source_row = torch.cat([nodes.row, embedding_nodes.row])
    source_layer = torch.cat([nodes.layer, torch.full_like(embedding_nodes.row, -1)])
    source_kind = torch.cat([torch.full_like(nodes.row, NEURON), torch.full_like(embedding_nodes.row, EMBEDDING)])
    source_index = torch.cat([torch.arange(len(nodes)), torch.arange(len(embedding_nodes))]).to(nodes.row)
    source_factor = torch.cat([activation, activation.new_ones(len(embedding_nodes))])

    def numerators(to_embeddings: torch.Tensor, to_nodes: torch.Tensor) -> torch.Tensor:
        """(C, sources) source factor * d target / d source, from probe gradients per row."""
        from_embeddings = to_embeddings[:, embedding_nodes.row, embedding_nodes.position]
        return torch.cat([to_nodes, from_embeddings], dim=1) * source_factor

    parts = []
    eps = _edge_eps(activation, nodes)
    chunks = node_vjps(lm, cut_pass, nodes, layers, config, to_nodes=True)
    for members, slot, to_embedding_rows, to_node_rows in chunks:
        target_at = torch.full((len(to_node_rows), len(batch.valid)), -1, dtype=torch.long, device=slot.device)
        target_at[slot, nodes.row[members]] = members
        target = target_at[:, source_row]  # (C, sources): the target each source pairs with in row c
        valid = target >= 0
        target = target.clamp_min(0)
        a_t = activation[target]
        weight = numerators(to_embedding_rows, to_node_rows) / (a_t + eps[target] * torch.where(a_t < 0, -1.0, 1.0))
        keep = valid & (source_layer[None, :] < nodes.layer[target]) & (weight.abs() >= config.edge_threshold)
        c, s = keep.nonzero(as_tuple=True)
        t = target[c, s]
        parts.append((source_row[s], source_kind[s], source_index[s], torch.full_like(t, NEURON), t, weight[c, s],
                      weight[c, s] * profiles.attribution[t]))

    to_nodes, to_embeddings = logit_vjps(cut_pass, nodes, keep_graph=False)  # (K, k), (B, T, k)
    logit_numerators = numerators(to_embeddings.permute(2, 0, 1), to_nodes.T).T  # (sources, k)
    weight = logit_numerators / cut_pass.target_logits.detach()[source_row]
    s, rank = (weight.abs() >= config.edge_threshold).nonzero(as_tuple=True)
    signed_logits = (cut_pass.target_logits.detach() * cut_pass.targets.coeffs.to(weight.dtype))
    parts.append((source_row[s], source_kind[s], source_index[s], torch.full_like(s, LOGIT), rank,
                  weight[s, rank], weight[s, rank] * signed_logits[source_row[s], rank]))

    return Edges(*(torch.cat(column) for column in zip(*parts)))


def _edge_eps(activation: torch.Tensor, nodes: Nodes) -> torch.Tensor:
    """1e-6 * mean |a| over the kept nodes of each node's prompt."""
    rows = int(nodes.row.max()) + 1 if len(nodes) else 0
    total = activation.new_zeros(rows).index_add_(0, nodes.row, activation.abs())
    count = activation.new_zeros(rows).index_add_(0, nodes.row, torch.ones_like(activation))
    return 1e-6 * (total / count.clamp_min(1))[nodes.row]
