"""Half-neuron attribution profiles, gathered from the trace tables as sparse per-prompt blocks.

A half-neuron is (layer, neuron, polarity). For each prompt it occurs in, its nodes' profiles are
summed over token positions. Row h of `inputs` holds, in prompt p's column block (one column per
token of p), h's input profile for p divided by its sum and scaled to unit length; `outputs` does
the same with one column per target logit, without the division. Dot products of rows are then
sums of per-prompt cosines over the prompts where both half-neurons occur.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp

from adag.cluster.keys import half_neuron_keys


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


def half_neuron_profiles(nodes: pd.DataFrame, prompts: pd.DataFrame) -> HalfNeuronProfiles:
    """Build the profiles from the trace stage's `nodes` and `prompts` tables."""
    keys, half_neuron = _unique_rows(half_neuron_keys(nodes))
    prompt_index = pd.Index(prompts["prompt"].to_numpy())
    p = prompt_index.get_indexer(nodes["prompt"].to_numpy())
    n_prompts = len(prompt_index)

    lengths = prompts["n_tokens"].to_numpy()
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    in_values = np.concatenate(nodes["input_profile"].to_numpy())
    in_counts = nodes["input_profile"].map(len).to_numpy()
    in_rows = np.repeat(half_neuron, in_counts)
    in_prompt = np.repeat(p, in_counts)
    in_cols = offsets[in_prompt] + np.concatenate([np.arange(n) for n in in_counts])
    inputs = _normalised_blocks(in_rows, in_cols, in_values, len(keys), np.repeat(np.arange(n_prompts), lengths),
                                n_prompts, divide_by_sum=True)

    k = len(nodes["output_profile"].iloc[0])
    out_values = np.concatenate(nodes["output_profile"].to_numpy())
    out_rows = np.repeat(half_neuron, k)
    out_cols = np.repeat(p, k) * k + np.tile(np.arange(k), len(nodes))
    outputs = _normalised_blocks(out_rows, out_cols, out_values, len(keys), np.repeat(np.arange(n_prompts), k),
                                 n_prompts, divide_by_sum=False)
    return HalfNeuronProfiles(keys, inputs[0], outputs[0], inputs[1], outputs[1], half_neuron)


def _unique_rows(frame: pd.DataFrame) -> tuple[pd.DataFrame, np.ndarray]:
    codes = frame.groupby(list(frame.columns), sort=True).ngroup().to_numpy()
    keys = frame.drop_duplicates().sort_values(list(frame.columns)).reset_index(drop=True)
    return keys, codes


def _normalised_blocks(rows, cols, values, n_rows, block_of_col, n_blocks, divide_by_sum):
    """Sum duplicate entries (several positions of one half-neuron in a prompt), then scale each
    (row, block) to unit length, first dividing by its sum if asked. Returns the matrix and the
    (row, block) indicator of non-zero blocks."""
    matrix = sp.csr_matrix((values.astype(np.float64), (rows, cols)), shape=(n_rows, len(block_of_col)))
    matrix.sum_duplicates()
    blocks = sp.csr_matrix((np.ones(len(block_of_col)), (np.arange(len(block_of_col)), block_of_col)),
                           shape=(len(block_of_col), n_blocks))
    coo = matrix.tocoo()
    entry_block = block_of_col[coo.col]
    if divide_by_sum:
        block_sum = _block_lookup(matrix @ blocks, coo.row, entry_block)
        coo.data = np.divide(coo.data, block_sum, out=coo.data.copy(), where=block_sum != 0)
        matrix = coo.tocsr()
        coo = matrix.tocoo()
    squared = sp.csr_matrix((coo.data ** 2, (coo.row, coo.col)), shape=matrix.shape) @ blocks
    norms = np.sqrt(_block_lookup(squared, coo.row, entry_block))
    coo.data = np.divide(coo.data, norms, out=np.zeros_like(coo.data), where=norms > 0)
    present = (squared > 0).astype(np.float64).tocsr()
    return coo.tocsr().astype(np.float32), present


def _block_lookup(matrix: sp.spmatrix, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    return np.asarray(sp.csr_matrix(matrix)[rows, cols]).ravel()
