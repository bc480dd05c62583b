"""Attribution graphs for one batch of prompts, in three passes that each return finished results.

1. Node scores (`node_scores`): one linearised forward pass and one backward pass of the metric
   give RelP_v = a_v * dm/da_v for every neuron at every position; `select_nodes` keeps the
   important ones.
2. Profiles (`profiles_pass`): a forward pass with a zero probe at each kept node and at each input
   embedding. k vector-Jacobian products from the target logits give every node's output profile
   and RelP, and every embedding's relevance. Input profiles come from forward mode (one tangent
   row per source position, `adag.trace.tangent`) or from one backward row per kept node,
   whichever costs less for the batch.
3. Edges (`edges_pass`): the same probes in a forward pass whose MLP outputs re-enter the model as
   constants, so that gradients only run through the residual stream and attention (direct
   effects). One batched VJP per chunk of target nodes gives all of their incoming edges, from
   kept neurons and kept embedding nodes alike; k VJPs from the target logits give the neuron ->
   logit and embedding -> logit edges.

Prompts in a batch never interact, so a batch-summed output gives per-prompt gradients.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from adag.half_neurons import positive_half
from adag.models import LoadedModel
from adag.trace.config import TraceConfig
from adag.trace.metric import Targets, at_least_float32, choose_targets, target_logits
from adag.trace.rules import FrozenValues, Hook, layer_names, linearised
from adag.trace.tangent import tangent_input_profiles
from adag.trace.tap import NeuronTap, NodeIndex, mlp_path, placement, tapped

# A backward row through one layer costs about this many tangent rows through one layer (same
# tokens). Measured on the built-in model (CPU, fp32, a 39-token prompt with 362 nodes): forward mode
# 6.0 s for 39 rows x 30 layers, VJP mode 28.3 s for 8295 row-layers, i.e. 5.1 against 3.4 ms each.
BACKWARD_ROW_COST = 0.7


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

    def selectable(self, keep_first_position: bool) -> torch.Tensor:
        """(B, T): positions that may hold nodes: not padding, nor each prompt's first position
        (an attention sink) unless configured."""
        allowed = self.valid.clone()
        if not keep_first_position:
            allowed[torch.arange(len(allowed)), self.offsets] = False
        return allowed


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

    def top_layer_by_rank(self, rank: torch.Tensor) -> torch.Tensor:
        """For each rank r, the highest layer of a rank-r node over the prompts: how deep a backward
        row for rank r reaches. Ranks follow layer order, so this never decreases."""
        top = torch.zeros(int(rank.max()) + 1, dtype=self.layer.dtype, device=rank.device)
        return top.scatter_reduce(0, rank, self.layer, "amax")


@dataclass
class NodeKeys:
    """Dataset-level node keys: (layer, position counted from the end of the prompt, neuron)."""

    layer: torch.Tensor
    from_end: torch.Tensor
    neuron: torch.Tensor

    def __len__(self) -> int:
        return len(self.layer)


@dataclass
class EmbeddingNodes:
    """Kept embedding nodes of a batch (one per input position), ordered by (row, position);
    positions are padded."""

    row: torch.Tensor
    position: torch.Tensor

    def __len__(self) -> int:
        return len(self.row)


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

    def selected_readouts(self, nodes: Nodes, readouts: torch.Tensor, members: torch.Tensor) -> torch.Tensor:
        """`members`' readouts r_n . x_n (x_n: the MLP input at the node's position), which have the
        gradient of the nodes' activations: a backward pass from them skips the dense gradient of
        every neuron at every position that starting from the activations would form."""
        parts = []
        for layer, index in nodes.by_layer(members).items():
            inputs = self.tap.mlp_inputs[layer]
            parts.append(placement(index, inputs.shape[:2], inputs.dtype).T @ inputs.flatten(0, 1))
        return (torch.cat(parts) * readouts[members].to(parts[0].dtype)).sum(-1)


def node_readouts(lm: LoadedModel, config: TraceConfig, linear_pass: LinearisedPass, nodes: Nodes) -> torch.Tensor:
    """(K, d): r_n = d a_n / d x_n for every kept node, x_n the MLP input at the node's position.

    An MLP reads each position alone, so running each layer's MLP (under the same rules) on just the
    nodes' input rows and taking one backward pass gives every node's r_n at once.
    """
    readouts = []
    layers = lm.adapter.layer_list(lm.model)
    captured: dict[int, torch.Tensor] = {}  # layer -> the input of its MLP output projection, as the rules left it
    capture = [Hook(name, lambda _m, args, layer=layer: captured.__setitem__(layer, args[0]), pre=True)
               for layer, name in enumerate(layer_names(lm.model, lm.adapter, lm.adapter.mlp_out))]
    with torch.enable_grad(), linearised(lm.model, lm.adapter, config.rules, after=capture):
        for layer, (row, position, neuron) in nodes.by_layer().items():
            rows = linear_pass.tap.mlp_inputs[layer][row, position].detach().requires_grad_(True)
            layers[layer].get_submodule(mlp_path(lm.adapter))(rows[None])
            (readout,) = torch.autograd.grad(captured.pop(layer)[0, torch.arange(len(neuron)), neuron].sum(), rows)
            readouts.append(readout)
    return torch.cat(readouts) if readouts else linear_pass.tap.embeddings.new_zeros(0, lm.model.config.hidden_size)


def linearised_pass(lm: LoadedModel, config: TraceConfig, batch: PromptBatch, nodes: Nodes | None = None,
                    cut: bool = False, frozen: FrozenValues | None = None) -> LinearisedPass:
    """One forward pass under the rules, with probes at `nodes` (and every embedding) if given."""
    index = nodes.by_layer() if nodes is not None else None
    with torch.enable_grad(), tapped(lm.model, lm.adapter, config.rules, index, cut, frozen) as tap:
        output = lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                          position_ids=batch.position_ids, logits_to_keep=1, use_cache=False)
        last = output.logits[:, -1]
        targets = choose_targets(config.metric, config.n_targets, last, batch.labels)
        softcap = lm.adapter.logit_softcap(lm.model) if config.rules != "plain" else None
        logits = target_logits(last, tap.unembedded, softcap, targets)
        probs = last.detach().float().softmax(-1).gather(-1, targets.ids)
    return LinearisedPass(tap, targets, logits, probs)


def working_memory(device: torch.device) -> int:
    """Bytes that one batched pass may use for its rows: a fixed 512 MiB on CPU (with the model
    this keeps a trace of the built-in model under about 2 GB), half of the free memory on a GPU."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] // 2
    return 512 * 2**20


def _rows_per_pass(config: TraceConfig, device: torch.device, bytes_per_row: int) -> int:
    return config.chunk_size or max(1, working_memory(device) // max(1, bytes_per_row))


# Phase 1


def node_scores(lm: LoadedModel, config: TraceConfig, batch: PromptBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """|RelP| / |m| for every (row, layer, position, neuron), zero where a node may not be kept
    (padding, the first position unless configured, blacklisted half-neurons). Also returns RelP."""
    base_pass = linearised_pass(lm, config, batch)
    activations = [base_pass.tap.activations[layer] for layer in range(lm.n_layers)]
    grads = torch.autograd.grad(base_pass.metric.sum(), activations)
    relp = torch.stack([at_least_float32(a * g).detach() for a, g in zip(activations, grads)], dim=1)  # (B, L, T, N)
    allowed = batch.selectable(config.keep_first_position)
    scores = relp.abs() / base_pass.metric.detach().abs().clamp_min(1e-12)[:, None, None, None]
    scores = scores * allowed[:, None, :, None]
    for layer, neuron, polarity in config.blacklist:
        scores[:, layer, :, neuron] *= positive_half(activations[layer][..., neuron].detach()) != (polarity > 0)
    return scores, relp


def _kept(scores: torch.Tensor, config: TraceConfig) -> torch.Tensor:
    """Boolean mask of kept entries of (B, ...) scores: threshold, or the top-K per leading row."""
    if config.selection == "threshold":
        keep = scores >= config.threshold
    else:
        flat = scores.flatten(1)
        top = flat.topk(min(config.top_nodes, flat.shape[1]), dim=1).indices
        keep = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, top, True).view_as(scores)
    return keep & (scores > 0)


def select_nodes(scores: torch.Tensor, config: TraceConfig) -> Nodes:
    """Keep nodes by threshold (score >= tau) or the top-K per prompt. `scores` is (B, L, T, N)."""
    return Nodes(*_kept(scores, config).nonzero(as_tuple=True)).sorted()


def select_keys(scores: torch.Tensor, config: TraceConfig) -> NodeKeys:
    """Dataset-level keys from aggregated (L, position from the end, N) scores."""
    _, layer, from_end, neuron = _kept(scores[None], config).nonzero(as_tuple=True)
    return NodeKeys(layer, from_end, neuron)


def pool_from_end(scores: torch.Tensor, config: TraceConfig, n_prompts: int) -> torch.Tensor:
    """(B, L, T, N) scores of a left-padded batch pooled over its prompts into (L, position from the end, N):
    the max (aggregation 'any') or the sum divided by `n_prompts` (a batch's share of a mean over n prompts)."""
    from_end = scores.flip(2)  # left padding: position from the end = width - 1 - position
    return from_end.amax(0) if config.aggregation == "any" else from_end.sum(0) / n_prompts


def select_batch_nodes(scores: torch.Tensor, batch: PromptBatch, config: TraceConfig) -> Nodes:
    """A batch's nodes: selected per prompt (aggregation 'none'), or keys pooled over the batch's prompts and
    kept in each of them (the reference's per-batch aggregation)."""
    if config.aggregation == "none":
        return select_nodes(scores, config)
    return nodes_from_keys(select_keys(pool_from_end(scores, config, len(scores)), config), batch, config)


def nodes_from_keys(keys: NodeKeys, batch: PromptBatch, config: TraceConfig) -> Nodes:
    """Place dataset-level keys in every prompt of a batch that is long enough, leaving out each
    prompt's first position unless configured."""
    rows, width = batch.input_ids.shape
    lengths = width - batch.offsets
    row = torch.arange(rows, device=lengths.device).repeat_interleave(len(keys))
    from_end = keys.from_end.repeat(rows)
    fits = from_end < lengths[row]
    if not config.keep_first_position:
        fits &= from_end != lengths[row] - 1
    nodes = Nodes(row, keys.layer.repeat(rows), width - 1 - from_end, keys.neuron.repeat(rows))
    return Nodes(nodes.row[fits], nodes.layer[fits], nodes.position[fits], nodes.neuron[fits]).sorted()


# Phase 2


@dataclass
class Profiles:
    """The profiles pass of one batch; node-indexed arrays follow `nodes`' order, positions are padded."""

    nodes: Nodes
    metric: torch.Tensor  # (B,)
    targets: Targets
    target_logits: torch.Tensor  # (B, k)
    target_probs: torch.Tensor  # (B, k)
    embedding_relevance: torch.Tensor  # (B, T): e_j . dm/de_j, zero on padding
    embedding_nodes: EmbeddingNodes
    activation: torch.Tensor  # (K,)
    attribution: torch.Tensor  # (K,) RelP
    input_profile: torch.Tensor  # (K, T)
    output_profile: torch.Tensor  # (K, k)
    input_profile_mode: str  # "forward" or "vjp", as chosen for this batch


def profiles_pass(lm: LoadedModel, config: TraceConfig, batch: PromptBatch, nodes: Nodes) -> Profiles:
    """RelP, output profiles, input profiles and embedding relevance of the kept nodes of a batch."""
    layers = list(nodes.by_layer())
    mode = input_profile_mode(config, batch, nodes)
    cut = config.profiles == "direct"
    frozen = FrozenValues() if mode == "forward" else None
    base_pass = linearised_pass(lm, config, batch, nodes, cut=cut, frozen=frozen)
    activation = at_least_float32(base_pass.selected_activations(nodes).detach())
    logits = base_pass.target_logits.detach()
    coeffs = base_pass.targets.coeffs.to(logits.dtype)
    to_nodes, to_embeddings = _logit_vjps(base_pass, layers, keep_graph=mode == "vjp")
    relevance = (to_embeddings * coeffs[:, None, :]).sum(-1) * batch.valid

    width = batch.input_ids.shape[1]
    if mode == "forward":
        embeddings = base_pass.tap.embeddings.detach()
        d_model, neurons = embeddings.shape[-1], lm.n_neurons
        bytes_per_source = len(batch.valid) * width * (4 * neurons + 8 * d_model) * embeddings.element_size()
        numerators = at_least_float32(tangent_input_profiles(
            lm, batch.input_ids, batch.attention_mask, batch.position_ids, embeddings, frozen, nodes.by_layer(),
            len(nodes), _rows_per_pass(config, embeddings.device, bytes_per_source), cut=cut))
    else:
        numerators = activation.new_zeros(len(nodes), width)
        for members, slot, to_embedding_rows, _ in _node_vjps(lm, base_pass, nodes, layers, config, to_nodes=False):
            numerators[members] = to_embedding_rows[slot, nodes.row[members]]
    metric = base_pass.metric.detach()
    return Profiles(
        nodes=nodes, metric=metric, targets=base_pass.targets, target_logits=logits,
        target_probs=base_pass.target_probs, embedding_relevance=relevance,
        embedding_nodes=select_embedding_nodes(relevance, metric, batch, config),
        activation=activation,
        attribution=activation * (to_nodes * coeffs[nodes.row]).sum(-1),
        input_profile=numerators / _nonzero(activation)[:, None],
        output_profile=activation[:, None] * to_nodes / logits[nodes.row],
        input_profile_mode=mode,
    )


def input_profile_mode(config: TraceConfig, batch: PromptBatch, nodes: Nodes) -> str:
    """'forward' or 'vjp': the configured mode, or under 'auto' the cheaper for this batch.

    Forward mode runs T tangent rows of T tokens per prompt through the layers up to the highest
    node; VJP mode runs one backward row per node rank (a row serves every prompt of the batch) from
    that rank's highest layer down to the embeddings. Both scale with the batch's tokens, so the
    comparison is T * (top layer + 1) against BACKWARD_ROW_COST * sum over ranks of (layer + 1).
    """
    if config.input_profiles != "auto":
        return config.input_profiles
    if config.rules != "half" or not len(nodes):
        return "vjp"
    top_by_rank = nodes.top_layer_by_rank(nodes.rank_in_prompt())
    forward_cost = batch.input_ids.shape[1] * (int(nodes.layer.max()) + 1)
    backward_cost = BACKWARD_ROW_COST * float((top_by_rank + 1).sum())
    return "forward" if forward_cost <= backward_cost else "vjp"


# Phase 3

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


def select_embedding_nodes(relevance: torch.Tensor, metric: torch.Tensor, batch: PromptBatch,
                           config: TraceConfig) -> EmbeddingNodes:
    """Embedding nodes kept by the neurons' threshold on |r_j| / |m|, at the positions that may hold nodes."""
    scores = relevance.abs() / metric.abs().clamp_min(1e-12)[:, None]
    keep = (scores >= config.threshold) & batch.selectable(config.keep_first_position)
    return EmbeddingNodes(*keep.nonzero(as_tuple=True))


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
    chunks = _node_vjps(lm, cut_pass, nodes, layers, config, to_nodes=True)
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

    to_nodes, to_embeddings = _logit_vjps(cut_pass, layers, keep_graph=False)  # (K, k), (B, T, k)
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


def _nonzero(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x == 0, torch.ones_like(x), x)


def _logit_vjps(linear_pass: LinearisedPass, layers: list[int], keep_graph: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """d logit_i / d a_n for every kept node (K, k), and e_j . d logit_i / d e_j (B, T, k)."""
    k = linear_pass.target_logits.shape[1]
    cotangents = torch.eye(k)[:, None, :].expand(k, *linear_pass.target_logits.shape).to(linear_pass.target_logits)
    grads = torch.autograd.grad(linear_pass.target_logits, [linear_pass.tap.embedding_probe,
                                                            *linear_pass.probes(layers)],
                                cotangents, is_grads_batched=True, retain_graph=keep_graph)
    to_nodes = torch.cat(grads[1:], dim=1) if layers else grads[0].new_zeros(k, 0)
    return at_least_float32(to_nodes.T), at_least_float32(grads[0].permute(1, 2, 0))


def _node_vjps(lm: LoadedModel, linear_pass: LinearisedPass, nodes: Nodes, layers: list[int], config: TraceConfig,
               to_nodes: bool) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """Batched VJPs from kept nodes' activations to every embedding probe (C, B, T) and, with
    `to_nodes`, to every kept node's probe (C, K).

    Cotangent row c holds, for every prompt, that prompt's node of rank r0 + c: prompts never
    interact, so one row serves B nodes at once. Ranks follow layer order, so a chunk only
    back-propagates through the layers below its highest node. Rows per chunk follow from the
    working memory. Yields each chunk's member node ids, their row `slot` in the chunk, and the
    gradients.
    """
    if not len(nodes):
        return
    embeddings = linear_pass.tap.embeddings
    batch, width, d_model = embeddings.shape
    neurons = linear_pass.tap.activations[0].shape[-1]
    bytes_per_row = batch * width * (3 * neurons + 6 * d_model) * embeddings.element_size()
    chunk_size = _rows_per_pass(config, embeddings.device, bytes_per_row)
    rank = nodes.rank_in_prompt()
    readouts = node_readouts(lm, config, linear_pass, nodes)
    inputs = [linear_pass.tap.embedding_probe] + (linear_pass.probes(layers) if to_nodes else [])
    for first, stop in _chunks(nodes, rank, chunk_size, layers_per_chunk=max(1, len(layers) // 8)):
        members = ((rank >= first) & (rank < stop)).nonzero(as_tuple=True)[0]
        slot = rank[members] - first
        selected = linear_pass.selected_readouts(nodes, readouts, members)
        cotangents = torch.zeros(int(slot.max()) + 1, len(members), dtype=selected.dtype, device=selected.device)
        cotangents[slot, torch.arange(len(members))] = 1
        grads = torch.autograd.grad(selected, inputs, cotangents, is_grads_batched=True, retain_graph=True,
                                    allow_unused=True)
        grads = [g if g is not None else x.new_zeros(len(cotangents), *x.shape) for g, x in zip(grads, inputs)]
        to_node_grads = at_least_float32(torch.cat(grads[1:], dim=1)) if to_nodes else None
        yield members, slot, at_least_float32(grads[0]), to_node_grads


def _chunks(nodes: Nodes, rank: torch.Tensor, max_rows: int, layers_per_chunk: int) -> Iterator[tuple[int, int]]:
    """Rank ranges [first, stop) of at most `max_rows` ranks whose highest layers (over the prompts)
    lie in one band of `layers_per_chunk` layers: a chunk back-propagates from its highest layer
    down, so mixing low and high ranks in one chunk would waste work on the low ones."""
    band = (nodes.top_layer_by_rank(rank) // layers_per_chunk).tolist()
    first = 0
    for r in range(1, len(band) + 1):
        if r == len(band) or r - first == max_rows or band[r] != band[first]:
            yield first, r
            first = r


@dataclass
class BatchAttribution:
    """Everything traced for one batch: the profiles pass and, if configured, the edges pass."""

    profiles: Profiles
    edges: Edges | None
