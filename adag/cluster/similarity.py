"""Multi-view similarity of half-neurons (DESIGN.md section 7), as sparse matrix products.

`similarity` gives the dense (H, H) matrix S. `knn_similarity` gives, for runs too large for a dense
matrix, the m most similar half-neurons of each one (symmetrised), computed strip by strip so that
no dense (H, H) array ever exists.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch

from adag.cluster.config import Combine
from adag.cluster.profiles import HalfNeuronProfiles

STRIP_ENTRIES = 1 << 24  # similarity values held at once by knn_similarity (a few hundred MB)


def combine_views(a: np.ndarray, b: np.ndarray, has_a: np.ndarray, has_b: np.ndarray,
                  how: Combine = "harmonic") -> np.ndarray:
    """Harmonic mean of the two views clamped at 0 (0 where both are 0), or their mean; where only
    one view exists, that view; where neither does (never co-occurring), 0. "input" and "output"
    use one view alone (for comparison)."""
    return _combine(np.where(has_a, a, 0.0), np.where(has_b, b, 0.0), has_a ^ has_b, how)


def _combine(a: np.ndarray, b: np.ndarray, one_view: np.ndarray | None, how: Combine) -> np.ndarray:
    """combine_views for views already 0 where absent; `one_view` marks pairs with exactly one view
    (None: there are none). Overwrites a and b: strips of S are large."""
    if how == "input":
        return a
    if how == "output":
        return b
    if how not in ("harmonic", "mean"):
        raise ValueError(f"unknown combination {how!r}; use harmonic, mean, input or output")
    single = (a + b)[one_view] if one_view is not None else None
    if how == "harmonic":
        np.maximum(a, 0, out=a)
        np.maximum(b, 0, out=b)
        total = a + b
        a *= b
        a *= 2
        combined = np.divide(a, total, out=a, where=total > 0)  # where total is 0, a is already 0
    else:
        combined = np.add(a, b, out=a)
        combined /= 2
    if single is not None:
        combined[one_view] = single
    return combined


class _StripSimilarity:
    """Strips of S on demand. Each view's similarity is the sum of per-prompt cosines (a product of
    the unit-length blocks) over the number of prompts where both half-neurons have that view.

    The columns come in `column_blocks` blocks of half-neurons, each with its transpose converted to
    CSR once (a product with a CSC operand would convert it on every call), so that a strip can
    skip the blocks to the left of the columns it needs."""

    def __init__(self, profiles: HalfNeuronProfiles, how: Combine, column_blocks: int = 1):
        self.how = how
        n = len(profiles)
        self.block_starts = np.unique(np.linspace(0, n, column_blocks + 1).astype(int))[:-1]
        views = {"input": (profiles.inputs, profiles.has_input), "output": (profiles.outputs, profiles.has_output)}
        needed = [how] if how in views else list(views)
        shared = len(needed) == 2 and (profiles.has_input != profiles.has_output).nnz == 0
        self.views = {name: self._split(views[name][0]) for name in needed}
        # Usually both views exist wherever a half-neuron occurs: one co-occurrence count serves both.
        self.presence = {name: self._split(views[name][1]) for name in (needed[:1] if shared else needed)}

    def _split(self, matrix: sp.csr_matrix) -> tuple[sp.csr_matrix, list[sp.csr_matrix]]:
        stops = [*self.block_starts[1:], matrix.shape[0]]
        return matrix, [matrix[start:stop].T.tocsr() for start, stop in zip(self.block_starts, stops)]

    def rows(self, rows: slice, first_column: int = 0) -> tuple[np.ndarray, int]:
        """S[rows, offset:] and offset, the start of the column block that holds `first_column`."""
        first = int(np.searchsorted(self.block_starts, first_column, side="right")) - 1
        blocks = [self._block(rows, block) for block in range(first, len(self.block_starts))]
        return (blocks[0] if len(blocks) == 1 else np.hstack(blocks)), int(self.block_starts[first])

    def _block(self, rows: slice, block: int) -> np.ndarray:
        counts = {name: (present[rows] @ transposes[block]).toarray()
                  for name, (present, transposes) in self.presence.items()}
        means = {}
        for name, (matrix, transposes) in self.views.items():
            count = counts[name] if name in counts else counts["input"]
            mean = (matrix[rows] @ transposes[block]).toarray()
            means[name] = np.divide(mean, count, out=mean, where=count > 0)  # the product is 0 where count is
        one_view = (counts["input"] > 0) ^ (counts["output"] > 0) if len(counts) == 2 else None
        return _combine(means.get("input"), means.get("output"), one_view, self.how)


def similarity(profiles: HalfNeuronProfiles, how: Combine = "harmonic") -> np.ndarray:
    """The dense (H, H) similarity matrix S."""
    return _StripSimilarity(profiles, how).rows(slice(None))[0]


def knn_similarity(profiles: HalfNeuronProfiles, neighbors: int, how: Combine = "harmonic",
                   strip_entries: int = STRIP_ENTRIES, column_blocks: int = 8) -> sp.csr_matrix:
    """S kept only between each half-neuron and its `neighbors` most similar others (positive values
    only, no diagonal), symmetrised: an entry stays if either end chose the other.

    S is symmetric, so a strip of rows [start, stop) is computed only from column `start` on (from
    the start of its column block, in fact): its rows are offered their entries from `start` on, and
    the columns after `stop` are offered the strip's rows. Each pair is offered once to each end,
    for about half the work of whole rows."""
    n = len(profiles)
    strips = _StripSimilarity(profiles, how, column_blocks)
    nearest = _Nearest(n, neighbors)
    step = max(1, strip_entries // max(n, 1))
    for start in range(0, n, step):
        stop = min(start + step, n)
        strip, offset = strips.rows(slice(start, stop), first_column=start)
        strip = strip[:, start - offset:]  # columns from start on
        strip[np.arange(stop - start), np.arange(stop - start)] = -np.inf  # not its own neighbour
        nearest.offer(slice(start, stop), strip, np.arange(start, n))
        nearest.offer(slice(stop, n), np.ascontiguousarray(strip[:, stop - start:].T), np.arange(start, stop))
    return nearest.graph()


def knn_graph(matrix: np.ndarray, neighbors: int) -> sp.csr_matrix:
    """The symmetrised nearest-neighbour graph of a dense similarity matrix (diagonal left out)."""
    nearest = _Nearest(len(matrix), neighbors)
    off_diagonal = matrix.astype(np.float32)
    np.fill_diagonal(off_diagonal, -np.inf)
    nearest.offer(slice(None), off_diagonal, np.arange(len(matrix)))
    return nearest.graph()


class _Nearest:
    """For each half-neuron, the `neighbors` largest similarities offered so far and their columns."""

    def __init__(self, n: int, neighbors: int):
        self.n, self.m = n, max(0, min(neighbors, n - 1))
        self.values = np.full((n, self.m), -np.inf, np.float32)
        self.columns = np.zeros((n, self.m), np.int64)

    def offer(self, rows: slice, values: np.ndarray, columns: np.ndarray) -> None:
        """Candidates: values[i, j] is the similarity of half-neuron rows[i] to half-neuron columns[j]."""
        k = min(self.m, values.shape[1])
        if k == 0 or not len(values):
            return
        top = _top(values, k)
        merged = np.concatenate([self.values[rows], np.take_along_axis(values, top, axis=1)], axis=1)
        merged_columns = np.concatenate([self.columns[rows], columns[top]], axis=1)
        keep = _top(merged, self.m)
        self.values[rows] = np.take_along_axis(merged, keep, axis=1)
        self.columns[rows] = np.take_along_axis(merged_columns, keep, axis=1)

    def graph(self) -> sp.csr_matrix:
        """The kept positive similarities, symmetrised (an entry stays if either end chose it)."""
        keep = self.values > 0
        knn = sp.csr_matrix((self.values[keep], (np.nonzero(keep)[0], self.columns[keep])), shape=(self.n, self.n))
        return knn.maximum(knn.T).tocsr()


def _top(values: np.ndarray, k: int) -> np.ndarray:
    """Column indices of the k largest entries of each row. torch.topk, because numpy's argpartition
    slows down about eightfold on the many exact ties (zeros) of a similarity strip."""
    return torch.topk(torch.from_numpy(values), k, dim=1, sorted=False).indices.numpy()
