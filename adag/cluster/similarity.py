"""Multi-view similarity of half-neurons (DESIGN.md section 7), as sparse matrix products.

`similarity` gives the dense (H, H) matrix S. `knn_similarity` gives, for runs too large for a dense
matrix, the m most similar half-neurons of each one (symmetrised), computed strip by strip so that
no dense (H, H) array ever exists.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import scipy.sparse as sp

from adag.cluster.profiles import HalfNeuronProfiles

Combine = Literal["harmonic", "mean", "input", "output"]
STRIP_ENTRIES = 1 << 24  # similarity values held at once by knn_similarity (a few hundred MB)


def combine_views(a: np.ndarray, b: np.ndarray, has_a: np.ndarray, has_b: np.ndarray,
                  how: Combine = "harmonic") -> np.ndarray:
    """Harmonic mean of the two views clamped at 0 (0 where both are 0), or their mean; where only
    one view exists, that view; where neither does (never co-occurring), 0. "input" and "output"
    use one view alone (for comparison)."""
    if how == "input":
        return np.where(has_a, a, 0.0)
    if how == "output":
        return np.where(has_b, b, 0.0)
    if how == "harmonic":
        a_pos, b_pos = np.clip(a, 0, None), np.clip(b, 0, None)
        total = a_pos + b_pos
        both = np.divide(2 * a_pos * b_pos, total, out=np.zeros_like(total), where=total > 0)
    elif how == "mean":
        both = (a + b) / 2
    else:
        raise ValueError(f"unknown combination {how!r}; use harmonic, mean, input or output")
    return np.where(has_a & has_b, both, np.where(has_a, a, np.where(has_b, b, 0.0)))


class _StripSimilarity:
    """Rows of S on demand. Each view's similarity is the sum of per-prompt cosines (a product of
    the unit-length blocks) over the number of prompts where both half-neurons have that view."""

    def __init__(self, profiles: HalfNeuronProfiles, how: Combine):
        self.how = how
        views = {"input": (profiles.inputs, profiles.has_input), "output": (profiles.outputs, profiles.has_output)}
        needed = [how] if how in views else list(views)
        # Transposes are converted to CSR once: a product with a CSC operand would convert it per call.
        self.views = {name: (blocks, blocks.T.tocsr(), present, present.T.tocsr())
                      for name, (blocks, present) in views.items() if name in needed}

    def rows(self, rows: slice) -> np.ndarray:
        means = {}
        for name, (blocks, blocks_t, present, present_t) in self.views.items():
            summed = (blocks[rows] @ blocks_t).toarray()
            count = (present[rows] @ present_t).toarray()
            means[name] = (np.divide(summed, count, out=np.zeros_like(summed), where=count > 0), count > 0)
        if self.how in means:
            mean, has = means[self.how]
            return np.where(has, mean, 0.0)
        (a, has_a), (b, has_b) = means["input"], means["output"]
        return combine_views(a, b, has_a, has_b, self.how)


def similarity(profiles: HalfNeuronProfiles, how: Combine = "harmonic") -> np.ndarray:
    """The dense (H, H) similarity matrix S."""
    return _StripSimilarity(profiles, how).rows(slice(None))


def knn_similarity(profiles: HalfNeuronProfiles, neighbors: int, how: Combine = "harmonic",
                   strip_entries: int = STRIP_ENTRIES) -> sp.csr_matrix:
    """S kept only between each half-neuron and its `neighbors` most similar others (positive values
    only, no diagonal), symmetrised: an entry stays if either end chose the other."""
    n = len(profiles)
    strips = _StripSimilarity(profiles, how)
    step = max(1, strip_entries // max(n, 1))
    parts = [nearest_neighbours(strips.rows(slice(start, min(start + step, n))), start, neighbors)
             for start in range(0, n, step)]
    rows, cols, values = (np.concatenate(column) for column in zip(*parts))
    knn = sp.csr_matrix((values, (rows, cols)), shape=(n, n))
    return knn.maximum(knn.T).tocsr()


def nearest_neighbours(strip: np.ndarray, first_row: int, neighbors: int) -> tuple[np.ndarray, ...]:
    """(row, column, value) of the `neighbors` largest positive entries of each row of a strip of S
    whose first row is `first_row`, leaving out each row's own column."""
    n_rows, n = strip.shape
    strip = strip.astype(np.float32)
    rows = np.arange(n_rows)
    strip[rows, first_row + rows] = -np.inf
    m = min(neighbors, n - 1)
    if m < 1:
        return np.zeros(0, int), np.zeros(0, int), np.zeros(0, np.float32)
    top = np.argpartition(-strip, m - 1, axis=1)[:, :m]
    values = np.take_along_axis(strip, top, axis=1)
    keep = values > 0
    return (first_row + np.repeat(rows, m))[keep.ravel()], top[keep], values[keep]
