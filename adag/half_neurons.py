"""Half-neurons: a neuron split by the sign of its activation, keyed (layer, neuron, polarity).

The rule that puts an activation in one half or the other lives here alone (`positive_half`); tracing's
blacklist, clustering, the run view and steering all use it."""

from __future__ import annotations

import numpy as np
import pandas as pd

HALF_NEURON_KEY = ["layer", "neuron", "polarity"]
HalfNeuron = tuple[int, int, int]  # (layer, neuron, polarity)


def positive_half(activation):
    """True where an activation belongs to its neuron's positive half (zero included), False where to the
    negative half. Works alike on numpy arrays, pandas Series and torch tensors (on their device)."""
    return ~(activation < 0)


def polarity(activation: np.ndarray | pd.Series) -> np.ndarray:
    """+1 where a neuron fires positively (or exactly zero), -1 where negatively."""
    return np.where(positive_half(np.asarray(activation)), 1, -1)


def half_neuron_keys(nodes: pd.DataFrame) -> pd.DataFrame:
    """(layer, neuron, polarity) of each row of the trace stage's nodes table."""
    return pd.DataFrame({"layer": nodes["layer"].to_numpy(), "neuron": nodes["neuron"].to_numpy(),
                         "polarity": polarity(nodes["activation"])})


def node_clusters(nodes: pd.DataFrame, half_neurons: pd.DataFrame) -> np.ndarray:
    """The cluster of each row of the trace stage's nodes table (-1 for a half-neuron left unclustered)."""
    merged = half_neuron_keys(nodes).merge(half_neurons[[*HALF_NEURON_KEY, "cluster"]], on=HALF_NEURON_KEY,
                                           how="left")
    return merged["cluster"].fillna(-1).astype(int).to_numpy()
