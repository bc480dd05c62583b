"""Half-neurons: a neuron split by the sign of its activation, keyed (layer, neuron, polarity)."""

from __future__ import annotations

import numpy as np
import pandas as pd

HALF_NEURON_KEY = ["layer", "neuron", "polarity"]


def polarity(activation: np.ndarray | pd.Series) -> np.ndarray:
    """+1 where a neuron fires positively (or exactly zero), -1 where negatively."""
    return np.where(np.asarray(activation) < 0, -1, 1)


def half_neuron_keys(nodes: pd.DataFrame) -> pd.DataFrame:
    """(layer, neuron, polarity) of each row of the trace stage's nodes table."""
    return pd.DataFrame({"layer": nodes["layer"].to_numpy(), "neuron": nodes["neuron"].to_numpy(),
                         "polarity": polarity(nodes["activation"])})


def node_clusters(nodes: pd.DataFrame, half_neurons: pd.DataFrame) -> np.ndarray:
    """The cluster of each row of the trace stage's nodes table (-1 for a half-neuron left unclustered)."""
    merged = half_neuron_keys(nodes).merge(half_neurons[[*HALF_NEURON_KEY, "cluster"]], on=HALF_NEURON_KEY,
                                           how="left")
    return merged["cluster"].fillna(-1).astype(int).to_numpy()
