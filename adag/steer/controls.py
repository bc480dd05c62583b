"""Random control sets for a steered cluster: as many half-neurons, in the same layers.

`layer` controls are any neurons of those layers; every traced set beats them, because traced
neurons matter and most neurons do not. `traced` controls are other traced half-neurons matched on
layer and on |attribution| (quantile bins within each layer), so a cluster that beats them matters
as a group, not merely for holding important neurons.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from adag.half_neurons import HALF_NEURON_KEY, HalfNeuron


def layer_control(members: list[HalfNeuron], n_neurons: int, rng: np.random.Generator) -> list[HalfNeuron]:
    """Random neurons of each member's layer, as many per layer as the members, with their polarities."""
    out = []
    for layer in sorted({h[0] for h in members}):
        same_layer = [h for h in members if h[0] == layer]
        neurons = rng.choice(n_neurons, size=len(same_layer), replace=False)
        out += [(layer, int(n), h[2]) for n, h in zip(neurons, same_layer)]
    return out


class TracedPool:
    """The traced half-neurons, each with its layer and |attribution| bin: the rank of its total
    |attribution| among the half-neurons of its layer, cut into `bins` equal-count bins."""

    def __init__(self, magnitudes: pd.DataFrame, bins: int, n_neurons: int):
        table = magnitudes.sort_values([*HALF_NEURON_KEY], ignore_index=True)
        rank = table.groupby("layer")["magnitude"].rank(method="first").to_numpy() - 1
        size = table.groupby("layer")["layer"].transform("size").to_numpy()
        self.keys: list[HalfNeuron] = list(zip(table["layer"].astype(int), table["neuron"].astype(int),
                                               table["polarity"].astype(int)))
        self.row = {key: i for i, key in enumerate(self.keys)}
        self.layer = table["layer"].to_numpy(dtype=np.int64)
        self.bin = (rank * bins // size).astype(np.int64)
        self.n_neurons = n_neurons  # per layer, for the last resort of a cluster holding most of the pool

    @classmethod
    def from_nodes(cls, node_keys: pd.DataFrame, bins: int, n_neurons: int) -> TracedPool:
        """The pool of a run: every traced half-neuron with its |attribution| summed over its nodes."""
        magnitudes = node_keys.assign(magnitude=node_keys["attribution"].abs()).groupby(
            HALF_NEURON_KEY, as_index=False)["magnitude"].sum()
        return cls(magnitudes, bins, n_neurons)

    def draw(self, members: list[HalfNeuron], rng: np.random.Generator) -> tuple[list[HalfNeuron], int]:
        """A control set for `members`: for each member, another traced half-neuron of its layer and
        bin, none repeated and none a member. Where a layer and bin has too few, the nearest others
        are taken (same layer first, then nearer layers); when no traced half-neuron is left (a
        cluster holding most of them), a random neuron of the member's layer. The number of
        half-neurons not matched on layer and bin is returned with the set."""
        rows = np.array([self.row[m] for m in members], dtype=np.int64)
        free = np.ones(len(self.keys), dtype=bool)
        free[rows] = False
        cells: dict[tuple[int, int], list[HalfNeuron]] = {}
        for member, row in zip(members, rows):
            cells.setdefault((int(self.layer[row]), int(self.bin[row])), []).append(member)
        chosen: list[HalfNeuron] = []
        short: list[tuple[int, int, int]] = []  # (layer, bin, polarity) of members not matched in their cell
        for (layer, bin_), cell_members in sorted(cells.items()):
            cell = np.flatnonzero(free & (self.layer == layer) & (self.bin == bin_))
            taken = rng.choice(cell, size=min(len(cell_members), len(cell)), replace=False)
            free[taken] = False
            chosen += [self.keys[i] for i in taken]
            short += [(layer, bin_, member[2]) for member in cell_members[len(taken):]]
        used = set(members) | set(chosen)
        for layer, bin_, polarity in short:
            candidates = np.flatnonzero(free)
            if len(candidates):
                nearest = candidates[np.lexsort((rng.random(len(candidates)), np.abs(self.bin[candidates] - bin_),
                                                 np.abs(self.layer[candidates] - layer)))[0]]
                free[nearest] = False
                pick = self.keys[nearest]
            else:
                pick = next(h for h in ((layer, int(n), polarity) for n in rng.permutation(self.n_neurons))
                            if h not in used)
            used.add(pick)
            chosen.append(pick)
        return chosen, len(short)


def percentile(value: float, controls: np.ndarray) -> float:
    """Where `value` falls among the controls, 0-100 (ties count half)."""
    return float(((controls < value).sum() + 0.5 * (controls == value).sum()) / len(controls) * 100)
