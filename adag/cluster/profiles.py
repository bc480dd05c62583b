"""Half-neuron attribution profiles, gathered from the trace tables as sparse per-prompt blocks.

A half-neuron is (layer, neuron, polarity). For each prompt it occurs in, its nodes' profiles are
summed over token positions. Row h of `inputs` holds, in prompt p's column block (one column per
token of p), h's summed input view for p divided by its sum and scaled to unit length; `outputs`
does the same with one column per target logit, without the division. Dot products of rows are
then sums of per-prompt cosines over the prompts where both half-neurons occur.

The views (DESIGN.md section 7) are built from the raw contributions by default, as the reference
does: the input profile times the activation, over the positions that can hold nodes (position 0 is
left out unless the trace kept it), and the output profile times the target logit. `views="share"`
clusters the stored shares over every position instead (the behaviour before the reference was
reproduced; the attention sink at position 0 then makes every half-neuron look alike).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp

from adag.cluster.config import Views
from adag.half_neurons import half_neuron_keys
from adag.view import first_counted_position, prompt_input_sums


@dataclass
class HalfNeuronProfiles:
    keys: pd.DataFrame  # layer, neuron, polarity (one row per half-neuron)
    inputs: sp.csr_matrix  # (H, sum of prompt lengths)
    outputs: sp.csr_matrix  # (H, prompts * k)
    has_input: sp.csr_matrix  # (H, P) 1 where the input block is non-zero
    has_output: sp.csr_matrix  # (H, P)
    node_half_neuron: np.ndarray  # for each row of the nodes table, its half-neuron

    def __len__(self) -> int:
        return len(self.keys)

    def subset(self, rows: np.ndarray) -> HalfNeuronProfiles:
        """The profiles of some half-neurons (nodes of the others map to -1)."""
        new_index = np.full(len(self), -1)
        new_index[rows] = np.arange(len(rows))
        return HalfNeuronProfiles(self.keys.iloc[rows].reset_index(drop=True), self.inputs[rows], self.outputs[rows],
                                  self.has_input[rows], self.has_output[rows], new_index[self.node_half_neuron])


def half_neuron_profiles(nodes: pd.DataFrame, prompts: pd.DataFrame, views: Views = "raw",
                         keep_first_position: bool = False) -> HalfNeuronProfiles:
    """Build the profiles from the trace stage's `nodes` and `prompts` tables.

    `keep_first_position` is the trace's setting: with raw views, position 0 enters the input view
    only if the trace could keep nodes there.
    """
    keys, half_neuron = _unique_rows(half_neuron_keys(nodes))
    prompt_index = pd.Index(prompts["prompt"].to_numpy())
    prompt = prompt_index.get_indexer(nodes["prompt"].to_numpy())
    units = _Units(half_neuron, prompt, len(keys), len(prompt_index))
    raw = views == "raw"
    # The share views (the behaviour before the reference) count every position, unweighted.
    keep_first = keep_first_position or not raw
    first = first_counted_position(keep_first)

    lengths = prompts["n_tokens"].to_numpy().astype(np.int64)
    widths = np.maximum(lengths - first, 0)
    offsets = np.concatenate([[0], np.cumsum(widths)])
    k = len(nodes["output_profile"].iloc[0])
    inputs = units.view(widths, offsets[-1])
    for sums in prompt_input_sums(nodes, half_neuron, keep_first, weighted=raw):
        units.write(inputs, units.node_unit[sums.nodes], sums.values, offsets, divide_by_sum=True)

    target_logits = np.stack(prompts["target_logits"].to_numpy()).astype(np.float64) if raw else None
    outputs = units.view(np.full(len(prompt_index), k), k * len(prompt_index))
    out_block = np.stack(nodes["output_profile"].to_numpy()).astype(np.float64)
    if raw:
        out_block *= target_logits[prompt]
    order = np.argsort(units.node_unit, kind="stable")
    unit = units.node_unit[order]
    starts = np.flatnonzero(np.r_[True, unit[1:] != unit[:-1]]) if len(unit) else np.zeros(0, int)
    summed = np.add.reduceat(out_block[order], starts, axis=0) if len(starts) else out_block[:0]
    units.write(outputs, unit[starts], summed, np.arange(len(prompt_index) + 1) * k, divide_by_sum=False)
    (inputs, has_input), (outputs, has_output) = units.finish(inputs), units.finish(outputs)
    return HalfNeuronProfiles(keys, inputs, outputs, has_input, has_output, half_neuron)


def _unique_rows(frame: pd.DataFrame) -> tuple[pd.DataFrame, np.ndarray]:
    codes = frame.groupby(list(frame.columns), sort=True).ngroup().to_numpy()
    keys = frame.drop_duplicates().sort_values(list(frame.columns)).reset_index(drop=True)
    return keys, codes


@dataclass
class _ViewArrays:
    """The CSR arrays of one view matrix while its units are written."""

    data: np.ndarray
    indices: np.ndarray
    indptr: np.ndarray
    n_cols: int
    unit_start: np.ndarray  # first entry of each unit
    unit_norm: np.ndarray  # length of each unit's summed block before scaling


class _Units:
    """The (half-neuron, prompt) pairs that occur, in CSR order (by half-neuron, then prompt).

    A view matrix has one row per half-neuron and one column block per prompt; a unit's block is
    the sum of its nodes' rows, divided by its sum if asked, then scaled to unit length. Blocks are
    written straight into the CSR arrays, one dense block of nodes at a time, so no per-entry index
    array of the whole run is ever built.
    """

    def __init__(self, half_neuron: np.ndarray, prompt: np.ndarray, n_rows: int, n_prompts: int):
        pair = half_neuron.astype(np.int64) * n_prompts + prompt
        pairs, self.node_unit = np.unique(pair, return_inverse=True)
        self.half_neuron, self.prompt = pairs // n_prompts, pairs % n_prompts
        self.n_rows, self.n_prompts = n_rows, n_prompts

    def view(self, widths: np.ndarray, n_cols: int) -> _ViewArrays:
        """Room for every unit's block, prompt p's block being widths[p] wide."""
        unit_width = widths[self.prompt]
        ends = np.cumsum(unit_width)
        indptr = np.concatenate([[0], np.cumsum(np.bincount(self.half_neuron, weights=unit_width,
                                                            minlength=self.n_rows)).astype(np.int64)])
        index_type = np.int32 if max(n_cols, indptr[-1]) < np.iinfo(np.int32).max else np.int64
        return _ViewArrays(np.zeros(indptr[-1], np.float32), np.zeros(indptr[-1], index_type), indptr, n_cols,
                           ends - unit_width, np.zeros(len(self.prompt)))

    def write(self, view: _ViewArrays, unit: np.ndarray, summed: np.ndarray, offsets: np.ndarray,
              divide_by_sum: bool) -> None:
        """Write some units' summed blocks (rows of `summed`, all of one width); prompt p's block starts at
        column offsets[p]."""
        if divide_by_sum:
            totals = summed.sum(axis=1, keepdims=True)
            summed = np.divide(summed, totals, out=summed, where=totals != 0)
        norms = np.linalg.norm(summed, axis=1)
        view.unit_norm[unit] = norms
        entries = view.unit_start[unit][:, None] + np.arange(summed.shape[1])
        view.data[entries] = np.divide(summed, norms[:, None], out=np.zeros_like(summed), where=norms[:, None] > 0)
        view.indices[entries] = offsets[self.prompt[unit]][:, None] + np.arange(summed.shape[1])

    def finish(self, view: _ViewArrays) -> tuple[sp.csr_matrix, sp.csr_matrix]:
        """The view matrix without explicit zeros, and the (half-neuron, prompt) indicator of its
        non-zero blocks."""
        matrix = sp.csr_matrix((view.data, view.indices, view.indptr), shape=(self.n_rows, view.n_cols))
        matrix.eliminate_zeros()
        present = view.unit_norm > 0
        indicator = sp.csr_matrix((np.ones(int(present.sum()), np.float32),
                                   (self.half_neuron[present], self.prompt[present])),
                                  shape=(self.n_rows, self.n_prompts))
        return matrix, indicator
