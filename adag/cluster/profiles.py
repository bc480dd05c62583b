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
from typing import Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp

Views = Literal["raw", "share"]
HALF_NEURON_KEY = ["layer", "neuron", "polarity"]


def half_neuron_keys(nodes: pd.DataFrame) -> pd.DataFrame:
    """Each node's half-neuron (layer, neuron, polarity); polarity is the activation's sign (+1 at 0)."""
    return pd.DataFrame({"layer": nodes["layer"].to_numpy(), "neuron": nodes["neuron"].to_numpy(),
                         "polarity": np.where(nodes["activation"].to_numpy() < 0, -1, 1)})


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
    n_prompts = len(prompt_index)
    activation = nodes["activation"].to_numpy().astype(np.float64)

    lengths = prompts["n_tokens"].to_numpy()
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    in_counts = nodes["input_profile"].map(len).to_numpy()
    in_values = _flat(nodes["input_profile"])
    in_node = np.repeat(np.arange(len(nodes)), in_counts)
    position = np.arange(len(in_values)) - np.repeat(np.cumsum(in_counts) - in_counts, in_counts)
    if views == "raw":
        in_values *= activation[in_node]
        if not keep_first_position:
            keep = position > 0
            in_values, in_node, position = in_values[keep], in_node[keep], position[keep]
    inputs, has_input = _normalised_blocks(half_neuron[in_node], offsets[prompt[in_node]] + position, in_values,
                                           len(keys), np.repeat(np.arange(n_prompts), lengths), n_prompts,
                                           divide_by_sum=True)

    k = len(nodes["output_profile"].iloc[0])
    out_values = _flat(nodes["output_profile"]).reshape(len(nodes), k)
    if views == "raw":
        out_values *= np.stack(prompts["target_logits"].to_numpy()).astype(np.float64)[prompt]
    out_cols = (prompt[:, None] * k + np.arange(k)).ravel()
    outputs, has_output = _normalised_blocks(np.repeat(half_neuron, k), out_cols, out_values.ravel(), len(keys),
                                             np.repeat(np.arange(n_prompts), k), n_prompts, divide_by_sum=False)
    return HalfNeuronProfiles(keys, inputs, outputs, has_input, has_output, half_neuron)


def _flat(column: pd.Series) -> np.ndarray:
    return np.concatenate(column.to_numpy()).astype(np.float64)


def _unique_rows(frame: pd.DataFrame) -> tuple[pd.DataFrame, np.ndarray]:
    codes = frame.groupby(list(frame.columns), sort=True).ngroup().to_numpy()
    keys = frame.drop_duplicates().sort_values(list(frame.columns)).reset_index(drop=True)
    return keys, codes


def _normalised_blocks(rows: np.ndarray, cols: np.ndarray, values: np.ndarray, n_rows: int, block_of_col: np.ndarray,
                       n_blocks: int, divide_by_sum: bool) -> tuple[sp.csr_matrix, sp.csr_matrix]:
    """Sum duplicate entries (several nodes of one half-neuron in a prompt), then scale each
    (row, block) to unit length, first dividing by its sum if asked (a zero sum leaves it as is).
    Returns the float32 matrix and the (row, block) indicator of its non-zero blocks."""
    matrix = sp.csr_matrix((values, (rows, cols)), shape=(n_rows, len(block_of_col)))
    matrix.sum_duplicates()
    # In canonical CSR order the entries of one (row, block) are contiguous: reduce over runs.
    entry_row = np.repeat(np.arange(n_rows), np.diff(matrix.indptr))
    entry_block = block_of_col[matrix.indices]
    new_run = np.ones(matrix.nnz, dtype=bool)
    new_run[1:] = (entry_row[1:] != entry_row[:-1]) | (entry_block[1:] != entry_block[:-1])
    starts = np.flatnonzero(new_run)
    run_of_entry = np.cumsum(new_run) - 1
    data = matrix.data
    if divide_by_sum and len(starts):
        sums = np.add.reduceat(data, starts)[run_of_entry]
        data = np.divide(data, sums, out=data.copy(), where=sums != 0)
    norms = np.sqrt(np.add.reduceat(data ** 2, starts)) if len(starts) else np.zeros(0)
    data = np.divide(data, norms[run_of_entry], out=np.zeros_like(data), where=norms[run_of_entry] > 0)
    views = sp.csr_matrix((data.astype(np.float32), matrix.indices, matrix.indptr), shape=matrix.shape)
    views.eliminate_zeros()
    nonzero = norms > 0
    present = sp.csr_matrix((np.ones(int(nonzero.sum()), dtype=np.float32),
                             (entry_row[starts][nonzero], entry_block[starts][nonzero])), shape=(n_rows, n_blocks))
    return views, present
