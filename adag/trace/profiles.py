"""Phase 2 of a trace: RelP, input and output profiles of the kept nodes, and the embeddings' relevance."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from adag.models import LoadedModel
from adag.trace.batch import EmbeddingNodes, Nodes, PromptBatch
from adag.trace.config import TraceConfig
from adag.trace.metric import Targets, at_least_float32
from adag.trace.nodes import NodeScores, score_nodes
from adag.trace.passes import (
    linearised_pass,
    logit_vjps,
    node_readouts,
    node_vjps,
    readouts_by_layer,
)
from adag.trace.rules import FrozenValues
from adag.trace.tangent import BasePass, Injections, Reads, plan_windows, push_forward

# A backward row through one layer costs about this many tangent rows through one layer (same
# tokens). Measured on the built-in model (CPU, fp32, a 39-token prompt with 362 nodes): forward mode
# 6.0 s for 39 rows x 30 layers, VJP mode 28.3 s for 8295 row-layers, i.e. 5.1 against 3.4 ms each.
BACKWARD_ROW_COST = 0.7


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
    base: BasePass | None  # the linearised pass the profiles went on from, with its constants (not under plain rules)


def profiles_pass(lm: LoadedModel, config: TraceConfig, batch: PromptBatch, nodes: Nodes,
                  scored: NodeScores | None = None) -> Profiles:
    """RelP, output profiles, input profiles and embedding relevance of the kept nodes of a batch.

    Total effects go on from phase 1's pass (`scored`, scored here if not given); direct effects
    need a pass of their own with every MLP output held constant."""
    layers = list(nodes.by_layer())
    mode = input_profile_mode(config, batch, nodes)
    cut = config.profiles == "direct"
    if cut:
        frozen = FrozenValues() if config.rules != "plain" else None
        base_pass = linearised_pass(lm, config, batch, nodes, cut=True, frozen=frozen)
    else:
        scored = scored or score_nodes(lm, config, batch)
        base_pass, frozen = scored.linear_pass, scored.frozen
    activation = at_least_float32(base_pass.selected_activations(nodes).detach())
    logits = base_pass.target_logits.detach()
    coeffs = base_pass.targets.coeffs.to(logits.dtype)
    to_nodes, to_embeddings = logit_vjps(base_pass, nodes, keep_graph=mode == "vjp")
    relevance = (to_embeddings * coeffs[:, None, :]).sum(-1) * batch.valid

    base = BasePass(batch, base_pass, frozen) if frozen is not None else None
    if mode == "forward":
        numerators = forward_input_profiles(lm, config, base, nodes, cut)
    else:
        numerators = activation.new_zeros(len(nodes), batch.input_ids.shape[1])
        for members, slot, to_embedding_rows, _ in node_vjps(lm, base_pass, nodes, layers, config, to_nodes=False):
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
        base=base,
    )


def forward_input_profiles(lm: LoadedModel, config: TraceConfig, base: BasePass, nodes: Nodes,
                           cut: bool) -> torch.Tensor:
    """(K, T) numerators e_j . d a_n / d e_j in forward mode: one tangent row per source position j
    (carrying e_j), from the last node's position down, in windows (`adag.trace.tangent`). With `cut`,
    every MLP output is held constant (direct effects)."""
    embeddings = base.linear_pass.tap.embeddings.detach() * base.batch.valid[..., None]  # padding is no source
    batch, width, _ = embeddings.shape
    result = embeddings.new_zeros(len(nodes), width)
    if not len(nodes):
        return result
    positions = list(range(int(nodes.position.max()), int(base.batch.offsets.min()) - 1, -1))
    readouts = readouts_by_layer(node_readouts(lm, config, base.linear_pass, nodes), nodes) if cut else None
    reads = Reads(nodes.by_layer(), readouts)
    plan = plan_windows(lm, config, base, positions, cut)
    for window in plan:
        slot, row = torch.cartesian_prod(torch.arange(window.sources), torch.arange(batch)).T.to(embeddings.device)
        position = torch.tensor(positions[window.first:window.stop], device=embeddings.device)[slot]
        injections = Injections(slot, row, torch.full_like(slot, -1), position, embeddings[row, position])
        read = push_forward(lm, base, window, injections, reads, cut)
        result[:, position[::batch]] = torch.cat([read[layer] for layer in reads.nodes], dim=1).T
    return result


def input_profile_mode(config: TraceConfig, batch: PromptBatch, nodes: Nodes) -> str:
    """'forward' or 'vjp': the configured mode, or under 'auto' the cheaper for this batch.

    Forward mode runs T tangent rows per prompt through the layers up to the highest node, the row of
    source position j over the T - j positions from j on (windows; (T + 1) / 2 positions on average);
    VJP mode runs one backward row of T tokens per node rank (a row serves every prompt of the batch)
    from that rank's highest layer down to the embeddings. So the comparison is (T + 1) / 2 * (top
    layer + 1) against BACKWARD_ROW_COST * sum over ranks of (layer + 1).
    """
    if config.input_profiles != "auto":
        return config.input_profiles
    if config.rules != "half" or not len(nodes):
        return "vjp"
    top_by_rank = nodes.top_layer_by_rank(nodes.rank_in_prompt())
    forward_cost = (batch.input_ids.shape[1] + 1) / 2 * (int(nodes.layer.max()) + 1)
    backward_cost = BACKWARD_ROW_COST * float((top_by_rank + 1).sum())
    return "forward" if forward_cost <= backward_cost else "vjp"


def select_embedding_nodes(relevance: torch.Tensor, metric: torch.Tensor, batch: PromptBatch,
                           config: TraceConfig) -> EmbeddingNodes:
    """Embedding nodes kept by the neurons' threshold on |r_j| / |m|, at the positions that may hold nodes."""
    scores = relevance.abs() / metric.abs().clamp_min(1e-12)[:, None]
    keep = (scores >= config.threshold) & batch.selectable(config.keep_first_position)
    return EmbeddingNodes(*keep.nonzero(as_tuple=True))


def _nonzero(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x == 0, torch.ones_like(x), x)
