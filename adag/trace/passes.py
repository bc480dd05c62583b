"""The linearised passes every phase of a trace runs, and the batched backward passes over them.

A pass is one forward pass of the model under the gradient rules (`adag.trace.rules`), with the tap
(`adag.trace.tap`) recording activations and adding probes at kept nodes. Backward passes from it are
batched vector-Jacobian products: from the k target logits (`logit_vjps`), or from kept nodes in
chunks of rows sized by the working-memory budget (`node_vjps`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from adag.models import LoadedModel
from adag.trace.batch import Nodes, PromptBatch
from adag.trace.config import DEFAULT_WORKING_MEMORY_MIB, TraceConfig
from adag.trace.metric import Targets, at_least_float32, choose_targets, target_logits
from adag.trace.rules import FrozenValues, Hook, layer_names, linearised
from adag.trace.tap import NeuronTap, mlp_path, placement, tapped


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
    nodes' input rows and taking one backward pass (through every layer's MLP at once: each node's
    activation depends on its own row only) gives every node's r_n.
    """
    if not len(nodes):
        return linear_pass.tap.embeddings.new_zeros(0, lm.model.config.hidden_size)
    layers = lm.adapter.layer_list(lm.model)
    captured: dict[int, torch.Tensor] = {}  # layer -> the input of its MLP output projection, as the rules left it
    capture = [Hook(name, lambda _m, args, layer=layer: captured.__setitem__(layer, args[0]), pre=True)
               for layer, name in enumerate(layer_names(lm.model, lm.adapter, lm.adapter.mlp_out))]
    inputs, activations = [], []
    with torch.enable_grad(), linearised(lm.model, lm.adapter, config.rules, after=capture):
        for layer, (row, position, neuron) in nodes.by_layer().items():
            inputs.append(linear_pass.tap.mlp_inputs[layer][row, position].detach().requires_grad_(True))
            layers[layer].get_submodule(mlp_path(lm.adapter))(inputs[-1][None])
            activations.append(captured.pop(layer)[0, torch.arange(len(neuron)), neuron].sum())
        readouts = torch.autograd.grad(activations, inputs)
    return torch.cat([readout.to(readouts[0].device) for readout in readouts])  # one device under a device map


def readouts_by_layer(readouts: torch.Tensor, nodes: Nodes) -> dict[int, torch.Tensor]:
    """(K, d) readouts in node order (layers ascending) split into {layer: (K_layer, d)}."""
    layers, counts = nodes.layer.unique(return_counts=True)
    return dict(zip(layers.tolist(), readouts.split(counts.tolist())))


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


def working_memory(config: TraceConfig, device: torch.device) -> int:
    """Bytes that one batched pass may hold for its rows: --working-memory-mib, else the device
    type's default (DEFAULT_WORKING_MEMORY_MIB), else (a GPU) half of its free memory."""
    mib = config.working_memory_mib or DEFAULT_WORKING_MEMORY_MIB.get(device.type)
    if mib is None:
        return torch.cuda.mem_get_info(device)[0] // 2
    return mib * 2**20


def rows_per_pass(config: TraceConfig, device: torch.device, bytes_per_row: int) -> int:
    """The one chunking rule: as many rows as the working-memory budget holds (at least one), unless
    --chunk-size fixes the count."""
    return config.chunk_size or max(1, working_memory(config, device) // max(1, bytes_per_row))


def logit_vjps(linear_pass: LinearisedPass, nodes: Nodes, keep_graph: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """d logit_i / d a_n for every node (K, k), and e_j . d logit_i / d e_j (B, T, k). Read at the
    nodes' probes, or in a pass without them (phase 1's) from the gradients to whole activations of
    the nodes' layers, which the backward pass forms on its way down anyway."""
    k = linear_pass.target_logits.shape[1]
    index = nodes.by_layer()
    probed = bool(linear_pass.tap.probes)
    reads = linear_pass.probes(list(index)) if probed else [linear_pass.tap.activations[layer] for layer in index]
    cotangents = torch.eye(k)[:, None, :].expand(k, *linear_pass.target_logits.shape).to(linear_pass.target_logits)
    grads = torch.autograd.grad(linear_pass.target_logits, [linear_pass.tap.embedding_probe, *reads],
                                cotangents, is_grads_batched=True, retain_graph=keep_graph)
    parts = grads[1:] if probed else [g[:, row, position, neuron] for g, (row, position, neuron)
                                      in zip(grads[1:], index.values())]
    to_nodes = torch.cat(parts, dim=1) if index else grads[0].new_zeros(k, 0)
    return at_least_float32(to_nodes.T), at_least_float32(grads[0].permute(1, 2, 0))


def node_vjps(lm: LoadedModel, linear_pass: LinearisedPass, nodes: Nodes, layers: list[int], config: TraceConfig,
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
    chunk_size = rows_per_pass(config, embeddings.device, bytes_per_row)
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
