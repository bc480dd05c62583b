"""Phase 1 of a trace: score every neuron at every position (RelP) and keep the important ones."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from adag.half_neurons import positive_half
from adag.models import LoadedModel
from adag.trace.batch import NodeKeys, Nodes, PromptBatch
from adag.trace.config import TraceConfig
from adag.trace.metric import at_least_float32
from adag.trace.passes import LinearisedPass, linearised_pass
from adag.trace.rules import FrozenValues


@dataclass
class NodeScores:
    """Phase 1's results, and its linearised pass, which the profiles phase goes on from (its graph is
    kept, with a probe on every input embedding and the constants of the half rule's forward mode)."""

    scores: torch.Tensor  # (B, L, T, N) |RelP| / |m|, zero where no node may be kept
    relp: torch.Tensor  # (B, L, T, N)
    linear_pass: LinearisedPass
    frozen: FrozenValues | None


def score_nodes(lm: LoadedModel, config: TraceConfig, batch: PromptBatch) -> NodeScores:
    """|RelP| / |m| for every (row, layer, position, neuron), zero where a node may not be kept
    (padding, the first position unless configured, blacklisted half-neurons), and RelP."""
    frozen = FrozenValues() if config.rules != "plain" else None
    base_pass = linearised_pass(lm, config, batch, Nodes.none(batch.input_ids.device), frozen=frozen)
    activations = [base_pass.tap.activations[layer] for layer in range(lm.n_layers)]
    grads = torch.autograd.grad(base_pass.metric.sum(), activations, retain_graph=True)
    relp = torch.stack([at_least_float32(a * g).detach() for a, g in zip(activations, grads)], dim=1)  # (B, L, T, N)
    allowed = batch.selectable(config.keep_first_position)
    scores = relp.abs() / base_pass.metric.detach().abs().clamp_min(1e-12)[:, None, None, None]
    scores = scores * allowed[:, None, :, None]
    for layer, neuron, polarity in config.blacklist:
        scores[:, layer, :, neuron] *= positive_half(activations[layer][..., neuron].detach()) != (polarity > 0)
    return NodeScores(scores, relp, base_pass, frozen)


def node_scores(lm: LoadedModel, config: TraceConfig, batch: PromptBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """`score_nodes`' scores and RelP, (B, L, T, N) each."""
    scored = score_nodes(lm, config, batch)
    return scored.scores, scored.relp


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
