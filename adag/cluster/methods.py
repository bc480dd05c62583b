"""Clustering half-neurons by profile similarity, with the baselines and diagnostics of DESIGN.md section 7."""

from __future__ import annotations

from typing import Literal, get_args

import numpy as np
import scipy.sparse as sp
from scipy.linalg import eigh
from scipy.sparse.linalg import eigsh
from sklearn.cluster import AgglomerativeClustering, KMeans, SpectralClustering
from sklearn.decomposition import TruncatedSVD
from sklearn.metrics import silhouette_score

from adag.cluster.config import Combine, Method
from adag.cluster.profiles import HalfNeuronProfiles
from adag.cluster.similarity import similarity

METHODS: tuple[str, ...] = get_args(Method)


class ProfileClustering:
    """Cluster half-neurons; parameters in the constructor, results as attributes after `fit`.

    Attributes after fit: `labels_` (one cluster per half-neuron), `similarity_` (H, H),
    `eigenvalues_` (top eigenvalues of the normalised affinity), `suggested_k_` (largest eigengap),
    `diagnostics_` (dict: k, suggested_k, silhouette, intra_inter_ratio).
    """

    def __init__(self, n_clusters: int | Literal["auto"] = 20, method: Method = "spectral",
                 combine: Combine = "harmonic", random_state: int = 0, max_clusters: int = 64, n_neighbors: int = 15):
        self.n_clusters = n_clusters
        self.method = method
        self.combine = combine
        self.random_state = random_state
        self.max_clusters = max_clusters
        self.n_neighbors = n_neighbors

    def fit(self, profiles: HalfNeuronProfiles) -> ProfileClustering:
        if self.method not in METHODS:
            raise ValueError(f"unknown clustering method {self.method!r}; use one of {', '.join(METHODS)}")
        self.similarity_ = similarity(profiles, self.combine)
        affinity = np.clip(self.similarity_, 0, None).astype(np.float64)
        np.fill_diagonal(affinity, 1.0)
        n = len(affinity)
        self.eigenvalues_, self.suggested_k_ = eigengap(affinity, self.max_clusters)
        k = self.suggested_k_ if self.n_clusters == "auto" else int(self.n_clusters)
        k = max(1, min(k, n))
        if k == 1:
            self.labels_ = np.zeros(n, dtype=int)
        elif self.method == "spectral":
            self.labels_ = SpectralClustering(k, affinity="precomputed", random_state=self.random_state,
                                              assign_labels="kmeans").fit_predict(affinity)
        elif self.method == "agglomerative":
            self.labels_ = AgglomerativeClustering(k, linkage="ward").fit_predict(self._features(profiles))
        elif self.method == "kmeans":
            self.labels_ = KMeans(k, random_state=self.random_state, n_init=10).fit_predict(self._features(profiles))
        else:
            self.labels_ = leiden(affinity, self.n_neighbors, self.random_state)
        self.diagnostics_ = {
            "method": self.method, "combine": self.combine, "half_neurons": n,
            "k": int(self.labels_.max()) + 1, "suggested_k": self.suggested_k_,
            "silhouette": silhouette(self.similarity_, self.labels_),
            "intra_inter_ratio": intra_inter_ratio(self.similarity_, self.labels_),
        }
        return self

    def _features(self, profiles: HalfNeuronProfiles) -> np.ndarray:
        """Concatenated profiles, reduced by truncated SVD so Ward and k-means stay dense and small."""
        stacked = sp.hstack([profiles.inputs, profiles.outputs]).tocsr()
        components = min(50, stacked.shape[0] - 1, stacked.shape[1] - 1)
        if components < 2:
            return stacked.toarray()
        return TruncatedSVD(components, random_state=self.random_state).fit_transform(stacked)


def eigengap(affinity: np.ndarray, max_k: int) -> tuple[np.ndarray, int]:
    """Top eigenvalues of D^-1/2 A D^-1/2 and the k (2..max_k) after which the gap is largest."""
    n = len(affinity)
    scale = 1 / np.sqrt(affinity.sum(1))
    normalised = affinity * scale[:, None] * scale[None, :]
    count = min(max_k + 1, n)
    if n <= 500 or count >= n - 1:
        values = eigh(normalised, eigvals_only=True)[::-1][:count]
    else:
        values = np.sort(eigsh(normalised, k=count, which="LA", return_eigenvectors=False))[::-1]
    if len(values) < 3:
        return values, 1
    gaps = values[1:-1] - values[2:]  # gap after the k-th eigenvalue, k = 2..count-1
    return values, int(np.argmax(gaps)) + 2


def silhouette(similarity_matrix: np.ndarray, labels: np.ndarray) -> float | None:
    if not 2 <= len(set(labels.tolist())) <= len(labels) - 1:
        return None
    distance = np.clip(1 - similarity_matrix, 0, 2).astype(np.float64)
    np.fill_diagonal(distance, 0)
    return float(silhouette_score(distance, labels, metric="precomputed"))


def intra_inter_ratio(similarity_matrix: np.ndarray, labels: np.ndarray) -> float | None:
    """Mean similarity of pairs in one cluster over the mean of pairs across clusters."""
    same = labels[:, None] == labels[None, :]
    off_diagonal = ~np.eye(len(labels), dtype=bool)
    intra, inter = similarity_matrix[same & off_diagonal], similarity_matrix[~same]
    if not len(intra) or not len(inter) or inter.mean() == 0:
        return None
    return float(intra.mean() / inter.mean())


def leiden(affinity: np.ndarray, n_neighbors: int, seed: int) -> np.ndarray:
    """Leiden communities of the symmetrised k-nearest-neighbour graph of the affinity."""
    import igraph
    import leidenalg

    n = len(affinity)
    off = affinity.copy()
    np.fill_diagonal(off, 0)
    neighbours = np.argsort(-off, axis=1)[:, :min(n_neighbors, n - 1)]
    rows = np.repeat(np.arange(n), neighbours.shape[1])
    cols = neighbours.ravel()
    weights = off[rows, cols]
    keep = weights > 0
    graph = sp.coo_matrix((weights[keep], (rows[keep], cols[keep])), shape=(n, n)).tocsr()
    graph = graph.maximum(graph.T).tocoo()
    upper = graph.row < graph.col
    g = igraph.Graph(n=n, edges=list(zip(graph.row[upper].tolist(), graph.col[upper].tolist())))
    g.es["weight"] = graph.data[upper].tolist()
    partition = leidenalg.find_partition(g, leidenalg.RBConfigurationVertexPartition, weights="weight", seed=seed)
    return np.asarray(partition.membership)
