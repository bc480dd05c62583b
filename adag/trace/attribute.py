"""Attribution graphs for one batch of prompts, in phases.

1. Node scores: one linearised forward pass and one backward pass of the metric give
   RelP_v = a_v * dm/da_v for every neuron at every position; `select_nodes` keeps the important ones.
2. Profiles: a forward pass with a zero probe added at each kept node. k vector-Jacobian products
   from the target logits give every node's output profile (and its RelP); one batched VJP per
   chunk of kept nodes, from the node's activation to the embeddings, gives the input profiles.
3. Edges: the same, in a forward pass whose MLP activations re-enter the model as constants, so
   that gradients only run through the residual stream and attention (direct effects). One batched
   VJP per chunk of target nodes gives all of their incoming edges at once; k VJPs from the target
   logits give the neuron -> logit edges.

Prompts in a batch never interact, so a batch-summed output gives per-prompt gradients.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from adag.models import LoadedModel
from adag.trace.config import TraceConfig
from adag.trace.metric import Targets, choose_targets, target_logits
from adag.trace.rules import linearised
from adag.trace.tap import NeuronTap, NodeIndex


@dataclass
class PromptBatch:
    """Left-padded prompts; `offsets[b]` is prompt b's padding, so padded position = offset + position."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    offsets: torch.Tensor
    labels: list[list[int]]

    @classmethod
    def left_pad(cls, token_lists: list[list[int]], labels: list[list[int]], pad_id: int,
                 device: torch.device) -> PromptBatch:
        width = max(len(tokens) for tokens in token_lists)
        ids = torch.full((len(token_lists), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(token_lists), width), dtype=torch.long)
        for row, tokens in enumerate(token_lists):
            ids[row, width - len(tokens):] = torch.tensor(tokens)
            mask[row, width - len(tokens):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        offsets = width - mask.sum(-1)
        return cls(ids.to(device), mask.to(device), positions.to(device), offsets.to(device), labels)

    @property
    def valid(self) -> torch.Tensor:
        return self.attention_mask.bool()


@dataclass
class Nodes:
    """Kept nodes of a batch, ordered by (layer, row, position, neuron); positions are padded."""

    row: torch.Tensor
    layer: torch.Tensor
    position: torch.Tensor
    neuron: torch.Tensor

    def __len__(self) -> int:
        return len(self.row)

    def sorted(self) -> Nodes:
        """The canonical order: by layer, then row, position and neuron."""
        order = torch.from_numpy(
            np.lexsort([t.cpu().numpy() for t in (self.neuron, self.position, self.row, self.layer)])
        ).to(self.row.device)
        return Nodes(self.row[order], self.layer[order], self.position[order], self.neuron[order])

    def by_layer(self, members: torch.Tensor | None = None) -> dict[int, NodeIndex]:
        """Per layer, the (row, position, neuron) index of the nodes (or of `members`, sorted ids)."""
        index = {}
        chosen = self.layer if members is None else self.layer[members]
        for layer in chosen.unique().tolist():
            ids = (self.layer == layer).nonzero(as_tuple=True)[0]
            if members is not None:
                ids = ids[torch.isin(ids, members)]
            index[layer] = (self.row[ids], self.position[ids], self.neuron[ids])
        return index

    def rank_in_prompt(self) -> torch.Tensor:
        """Each node's rank among the nodes of its own prompt, in node order."""
        order = torch.argsort(self.row, stable=True)
        counts = torch.bincount(self.row)
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.empty_like(self.row)
        rank[order] = torch.arange(len(self.row), device=self.row.device) - starts[self.row[order]]
        return rank


@dataclass
class LinearisedPass:
    """What one linearised forward pass leaves for the backward passes."""

    tap: NeuronTap
    targets: Targets
    target_logits: torch.Tensor  # (B, k)
    target_probs: torch.Tensor  # (B, k) the model's next-token probabilities of the targets

    @property
    def metric(self) -> torch.Tensor:
        return (self.target_logits * self.targets.coeffs).sum(-1)

    def probes(self, layers: list[int]) -> list[torch.Tensor]:
        return [self.tap.probes[layer] for layer in layers]

    def selected_activations(self, nodes: Nodes, members: torch.Tensor | None = None) -> torch.Tensor:
        """Kept nodes' (or `members`') activations in node order, still connected to the graph."""
        parts = [self.tap.activations[layer][index] for layer, index in nodes.by_layer(members).items()]
        return torch.cat(parts) if parts else self.tap.embeddings.new_zeros(0)


def linearised_pass(lm: LoadedModel, config: TraceConfig, batch: PromptBatch,
                    nodes: Nodes | None = None, cut: bool = False) -> LinearisedPass:
    index = nodes.by_layer() if nodes is not None else None
    with torch.enable_grad(), linearised(lm.model, lm.adapter, config.rules), \
            NeuronTap(lm.model, lm.adapter, index, cut) as tap:
        output = lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                          position_ids=batch.position_ids, logits_to_keep=1, use_cache=False)
        last = output.logits[:, -1]
        targets = choose_targets(config.metric, config.k, last, batch.labels)
        softcap = lm.adapter.logit_softcap(lm.model) if config.rules != "plain" else None
        logits = target_logits(last, tap.unembedded, softcap, targets)
        probs = last.detach().float().softmax(-1).gather(-1, targets.ids)
    return LinearisedPass(tap, targets, logits, probs)


# Phase 1


def node_scores(lm: LoadedModel, config: TraceConfig, batch: PromptBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """|RelP| / |m| for every (row, layer, position, neuron), zero where a node may not be kept
    (padding, the first position unless configured, blacklisted half-neurons). Also returns RelP."""
    run = linearised_pass(lm, config, batch)
    layers = range(lm.n_layers)
    activations = [run.tap.activations[layer] for layer in layers]
    grads = torch.autograd.grad(run.metric.sum(), activations)
    relp = torch.stack([(a * g).float().detach() for a, g in zip(activations, grads)], dim=1)  # (B, L, T, N)
    allowed = batch.valid.clone()
    if not config.keep_first_position:
        allowed[torch.arange(len(allowed)), batch.offsets] = False
    scores = relp.abs() / run.metric.detach().abs().clamp_min(1e-12)[:, None, None, None]
    scores = scores * allowed[:, None, :, None]
    for layer, neuron, polarity in config.blacklist:
        signs = torch.sign(activations[layer][..., neuron].detach())
        scores[:, layer, :, neuron] *= signs != polarity
    return scores, relp


def select_nodes(scores: torch.Tensor, config: TraceConfig) -> Nodes:
    """Keep nodes by threshold (score >= tau) or the top-K per prompt. `scores` is (B, L, T, N)."""
    if config.selection == "threshold":
        keep = scores >= config.threshold
    else:
        flat = scores.flatten(1)
        top = flat.topk(min(config.top_nodes, flat.shape[1]), dim=1).indices
        keep = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, top, True).view_as(scores)
    keep &= scores > 0
    return Nodes(*keep.nonzero(as_tuple=True)).sorted()


def nodes_from_keys(keys: Nodes, batch: PromptBatch, config: TraceConfig) -> Nodes:
    """Place dataset-level keys (layer, position counted from the end, neuron) in every prompt of a
    batch that is long enough, leaving out each prompt's first position unless configured."""
    rows, width = batch.input_ids.shape
    lengths = width - batch.offsets
    row = torch.arange(rows, device=lengths.device).repeat_interleave(len(keys))
    from_end = keys.position.repeat(rows)
    fits = from_end < lengths[row]
    if not config.keep_first_position:
        fits &= from_end != lengths[row] - 1
    nodes = Nodes(row, keys.layer.repeat(rows), width - 1 - from_end, keys.neuron.repeat(rows))
    return Nodes(nodes.row[fits], nodes.layer[fits], nodes.position[fits], nodes.neuron[fits]).sorted()


# Phases 2 and 3


@dataclass
class BatchAttribution:
    """Everything traced for one batch; node-indexed arrays follow `nodes`' order."""

    nodes: Nodes
    metric: torch.Tensor  # (B,)
    targets: Targets
    target_logits: torch.Tensor  # (B, k)
    target_probs: torch.Tensor  # (B, k)
    embedding_relevance: torch.Tensor  # (B, T)
    activation: torch.Tensor  # (K,)
    attribution: torch.Tensor  # (K,) RelP
    input_profile: torch.Tensor  # (K, T) padded positions
    output_profile: torch.Tensor  # (K, k)
    edges: torch.Tensor | None = None  # (E, 3): source node, target node, weight
    logit_edges: torch.Tensor | None = None  # (K, k) direct neuron -> logit weights


def attribute(lm: LoadedModel, config: TraceConfig, batch: PromptBatch, nodes: Nodes) -> BatchAttribution:
    """Phases 2 and 3 for the kept nodes of one batch: RelP, profiles, edges."""
    layers = list(nodes.by_layer())
    need_cut = config.edges or config.profiles == "direct"
    total = linearised_pass(lm, config, batch, nodes) if config.profiles == "total" else None
    cut = linearised_pass(lm, config, batch, nodes, cut=True) if need_cut else None
    profiled = total if total is not None else cut

    activation = profiled.selected_activations(nodes).detach().float()
    logit_grads, embedding_grads = _logit_vjps(profiled, layers)
    coeffs = profiled.targets.coeffs
    relp = activation * (logit_grads * coeffs[nodes.row]).sum(-1)
    output_profile = activation[:, None] * logit_grads / profiled.target_logits.detach()[nodes.row]
    embeddings = profiled.tap.embeddings.detach().float()
    embedding_relevance = (embeddings * torch.einsum("kbtd,bk->btd", embedding_grads, coeffs.float())).sum(-1)

    input_profile = torch.zeros(len(nodes), batch.input_ids.shape[1])
    edge_chunks = []
    eps = _edge_eps(activation, nodes)
    for members, slot, to_embeddings, to_nodes in _node_vjps(
            profiled, nodes, layers, config.chunk_size, to_embeddings=True, to_nodes=profiled is cut and config.edges):
        contributions = (to_embeddings * embeddings).sum(-1)  # (C, B, T)
        input_profile[members] = contributions[slot, nodes.row[members]] / _nonzero(activation[members])[:, None]
        if to_nodes is not None:
            edge_chunks.append(_edges(members, slot, to_nodes, activation, eps, nodes, config.edge_threshold))
    if config.edges and profiled is not cut:
        for members, slot, _, to_nodes in _node_vjps(cut, nodes, layers, config.chunk_size, to_embeddings=False,
                                                     to_nodes=True):
            edge_chunks.append(_edges(members, slot, to_nodes, activation, eps, nodes, config.edge_threshold))

    result = BatchAttribution(nodes, profiled.metric.detach(), profiled.targets, profiled.target_logits.detach(),
                              profiled.target_probs, embedding_relevance.float(), activation, relp, input_profile,
                              output_profile)
    if config.edges:
        direct_logit_grads, _ = _logit_vjps(cut, layers) if profiled is not cut else (logit_grads, None)
        result.edges = torch.cat(edge_chunks) if edge_chunks else torch.zeros((0, 3))
        result.logit_edges = activation[:, None] * direct_logit_grads / cut.target_logits.detach()[nodes.row]
    return result


def _edge_eps(activation: torch.Tensor, nodes: Nodes) -> torch.Tensor:
    """1e-6 * mean |a| over the kept nodes of each node's prompt."""
    rows = int(nodes.row.max()) + 1 if len(nodes) else 0
    total = torch.zeros(rows).index_add_(0, nodes.row, activation.abs())
    count = torch.zeros(rows).index_add_(0, nodes.row, torch.ones_like(activation))
    return 1e-6 * (total / count.clamp_min(1))[nodes.row]


def _nonzero(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x == 0, torch.ones_like(x), x)


def _logit_vjps(run: LinearisedPass, layers: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """d logit_i / d a_n for every kept node (K, k), and d logit_i / d e (k, B, T, d)."""
    k = run.target_logits.shape[1]
    cotangents = torch.eye(k)[:, None, :].expand(k, *run.target_logits.shape).to(run.target_logits)
    grads = torch.autograd.grad(run.target_logits, [run.tap.embeddings, *run.probes(layers)], cotangents,
                                is_grads_batched=True, retain_graph=True)
    to_nodes = torch.cat(grads[1:], dim=1) if layers else grads[0].new_zeros(k, 0)
    return to_nodes.T.float(), grads[0].float()


def _node_vjps(run: LinearisedPass, nodes: Nodes, layers: list[int], chunk_size: int, to_embeddings: bool,
               to_nodes: bool) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]]:
    """Batched VJPs from kept nodes' activations to the embeddings (C, B, T, d) and/or to every kept
    node's probe (C, K).

    Cotangent row c holds, for every prompt, that prompt's node of rank r0 + c: prompts never
    interact, so one row serves B nodes at once. Ranks follow layer order, so a chunk only
    back-propagates through the layers below its highest node. Yields each chunk's member node ids,
    their row `slot` in the chunk, and the gradients.
    """
    rank = nodes.rank_in_prompt()
    inputs = ([run.tap.embeddings] if to_embeddings else []) + (run.probes(layers) if to_nodes else [])
    for first in range(0, int(rank.max()) + 1 if len(nodes) else 0, chunk_size):
        members = ((rank >= first) & (rank < first + chunk_size)).nonzero(as_tuple=True)[0]
        slot = rank[members] - first
        selected = run.selected_activations(nodes, members)
        cotangents = torch.zeros(int(slot.max()) + 1, len(members), dtype=selected.dtype, device=selected.device)
        cotangents[slot, torch.arange(len(members))] = 1
        grads = torch.autograd.grad(selected, inputs, cotangents, is_grads_batched=True, retain_graph=True,
                                    allow_unused=True)
        grads = [g if g is not None else x.new_zeros(len(cotangents), *x.shape) for g, x in zip(grads, inputs)]
        to_embedding_grads = grads[0].float() if to_embeddings else None
        to_node_grads = torch.cat(grads[int(to_embeddings):], dim=1).float() if to_nodes else None
        yield members, slot, to_embedding_grads, to_node_grads


def _edges(members: torch.Tensor, slot: torch.Tensor, jacobian: torch.Tensor, activation: torch.Tensor,
           eps: torch.Tensor, nodes: Nodes, threshold: float) -> torch.Tensor:
    """Direct edges into a chunk's target nodes: w(s -> t) = a_s * da_t/da_s / (a_t + eps), with eps
    taking a_t's sign so the denominator never crosses zero. `jacobian[c, s]` is d a_t / d a_s for
    the target t of prompt row(s) in slot c. Returns rows (source, target, weight)."""
    target_at = torch.full((len(jacobian), int(nodes.row.max()) + 1), -1, dtype=torch.long)
    target_at[slot, nodes.row[members]] = members
    target = target_at[:, nodes.row]  # (C, K): the target each source s pairs with in slot c
    has_target = target >= 0
    target = target.clamp_min(0)
    a_t = activation[target]
    weight = activation[None, :] * jacobian / (a_t + eps[target] * torch.where(a_t < 0, -1.0, 1.0))
    keep = has_target & (nodes.layer[None, :] < nodes.layer[target]) & (weight.abs() >= threshold)
    c, s = keep.nonzero(as_tuple=True)
    return torch.stack([s.double(), target[c, s].double(), weight[c, s].double()], dim=1)
