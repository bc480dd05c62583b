"""What one batch of a trace is about: its left-padded prompts and the nodes kept in them."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from adag.trace.tap import NodeIndex


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

    @classmethod
    def none(cls, device: torch.device) -> Nodes:
        """No node: a pass with probes on the input embeddings only."""
        empty = torch.zeros(0, dtype=torch.long, device=device)
        return cls(empty, empty, empty, empty)

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

