"""Attribution graphs for one batch of prompts, phase after phase (DESIGN.md sections 4-6).

1. Nodes (`adag.trace.nodes`): one linearised forward pass and one backward pass of the metric give
   RelP_v = a_v * dm/da_v for every neuron at every position; the important ones are kept. The pass
   (with a probe on each input embedding) is kept for phase 2.
2. Profiles (`adag.trace.profiles`): k vector-Jacobian products from the target logits through phase
   1's pass give every kept node's output profile and RelP and every embedding's relevance; input
   profiles come from forward mode (`adag.trace.tangent`: one tangent row per source position, with
   phase 1's constants) or from one backward row per kept node. Direct-effect profiles run a pass of
   their own with every MLP output held constant.
3. Edges (`adag.trace.edges`): direct effects, every MLP output held. In forward mode one tangent row
   per source (kept neuron or embedding node) from phase 1's constants gives all of its outgoing
   edges, into neurons and target logits; under plain gradients, a cut forward pass with probes,
   one backward row per target neuron and k from the target logits.

Prompts in a batch never interact, so a batch-summed output gives per-prompt gradients.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from adag.models import LoadedModel
from adag.trace.batch import NodeKeys, Nodes, PromptBatch
from adag.trace.config import TraceConfig
from adag.trace.edges import Edges, edges_pass
from adag.trace.nodes import nodes_from_keys, score_nodes, select_batch_nodes
from adag.trace.profiles import Profiles, profiles_pass

__all__ = ["BatchAttribution", "Nodes", "PhaseTimer", "PromptBatch", "attribute"]
logger = logging.getLogger(__name__)


class PhaseTimer:
    """Seconds per phase, summed over batches (waiting for the GPU before reading the clock); each
    phase's time is also logged (DEBUG) as it ends."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        started = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - started
        self.seconds[phase] += seconds
        logger.debug("trace phase %s: %.3f s", phase, seconds)


@dataclass
class BatchAttribution:
    """Everything traced for one batch: the profiles pass and, if configured, the edges pass."""

    profiles: Profiles
    edges: Edges | None
    largest_score: float = 0.0  # the largest |RelP| / |m| among the batch's neurons (0 with given keys)


def attribute(lm: LoadedModel, config: TraceConfig, batch: PromptBatch, keys: NodeKeys | None = None,
              timer: PhaseTimer | None = None) -> BatchAttribution:
    """The attribution graph of one batch: its nodes (selected here, or the dataset-level `keys`
    placed in each prompt), their profiles and, if configured, the direct edges between them."""
    timer = timer or PhaseTimer(lm.device)
    largest_score, scored = 0.0, None
    with timer("node_scores"):
        if keys is None:
            scored = score_nodes(lm, config, batch)
            largest_score = float(scored.scores.max())
            nodes = select_batch_nodes(scored.scores, batch, config)
        else:
            nodes = nodes_from_keys(keys, batch, config)
    with timer("profiles"):
        profiles = profiles_pass(lm, config, batch, nodes, scored)
    with timer("edges"):
        edges = edges_pass(lm, config, batch, profiles) if config.edges else None
    profiles.base = None  # the linearised pass is not needed past the edges: let its memory go
    return BatchAttribution(profiles, edges, largest_score)
