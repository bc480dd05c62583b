"""Clustering half-neurons by profile similarity, with the baselines and diagnostics of DESIGN.md section 7."""

from __future__ import annotations

from typing import Literal, get_args

import numpy as np
import scipy.sparse as sp
from sklearn.cluster import AgglomerativeClustering, KMeans, SpectralClustering
from sklearn.decomposition import TruncatedSVD

from adag.cluster.config import CLUSTERS, DENSE_LIMIT, MAX_CLUSTERS, NEIGHBORS, Combine, Embedding, Method
from adag.cluster.profiles import HalfNeuronProfiles
from adag.cluster.similarity import knn_graph, knn_similarity, similarity
from adag.cluster.spectral import (
    eigengap,
    embedding_labels,
    intra_inter_ratio,
    normalised_affinity,
    reference_affinity,
    silhouette,
    top_eigenvectors,
)

METHODS: tuple[str, ...] = get_args(Method)
DIAGNOSTICS_SAMPLE = 5000  # half-neurons whose dense similarity gives the diagnostics of a sparse clustering


class ProfileClustering:
    """Cluster half-neurons; parameters in the constructor, results as attributes after `fit`.

    Up to `dense_limit` half-neurons the similarity S is a dense matrix and the spectral embedding a
    dense eigendecomposition (the reference algorithm). Above it, S keeps each half-neuron's
    `neighbors` most similar others (symmetrised, sparse) and ARPACK finds the eigenvectors; the
    silhouette and intra/inter ratio are then measured on the dense S of a fixed random sample of
    DIAGNOSTICS_SAMPLE half-neurons, so they stay comparable with smaller runs.

    Attributes after fit: `labels_` (one cluster per half-neuron), `affinity_` (A = max(S, 0) with
    diagonal 1, dense or sparse), `eigenvalues_` (top eigenvalues of the normalised affinity N),
    `suggested_k_` (largest eigengap), `diagnostics_` (dict: k, suggested_k, silhouette, intra_inter_ratio).
    """

    def __init__(self, n_clusters: int | Literal["auto"] = CLUSTERS, method: Method = "spectral",
                 combine: Combine = "harmonic", embedding: Embedding = "reference", random_state: int = 0,
                 max_clusters: int = MAX_CLUSTERS, neighbors: int = NEIGHBORS, dense_limit: int = DENSE_LIMIT):
        self.n_clusters = n_clusters
        self.method = method
        self.combine = combine
        self.embedding = embedding
        self.random_state = random_state
        self.max_clusters = max_clusters
        self.neighbors = neighbors
        self.dense_limit = dense_limit

    def fit(self, profiles: HalfNeuronProfiles) -> ProfileClustering:
        if self.method not in METHODS:
            raise ValueError(f"unknown clustering method {self.method!r}; use one of {', '.join(METHODS)}")
        n = len(profiles)
        if self.n_clusters != "auto" and not 2 <= self.n_clusters <= n:
            raise ValueError(f"cannot make {self.n_clusters} clusters of {n} half-neurons; "
                             f"choose k from 2 to {n}, or 'auto'")
        sparse = n > self.dense_limit
        if sparse:
            self.affinity_ = reference_affinity(knn_similarity(profiles, self.neighbors, self.combine))
        else:
            self.affinity_ = reference_affinity(similarity(profiles, self.combine))
        wanted = self.max_clusters + 1 if self.n_clusters == "auto" else max(self.n_clusters, self.max_clusters + 1)
        self.eigenvalues_, vectors = top_eigenvectors(normalised_affinity(self.affinity_), wanted, self.random_state)
        self.suggested_k_ = eigengap(self.eigenvalues_, self.max_clusters)
        k = min(self.suggested_k_, n) if self.n_clusters == "auto" else self.n_clusters
        if k == 1:
            self.labels_ = np.zeros(n, dtype=int)
        elif self.method == "spectral" and self.embedding == "reference":
            self.labels_ = embedding_labels(vectors, k, self.random_state)
        elif self.method == "spectral":
            self.labels_ = SpectralClustering(k, affinity="precomputed", random_state=self.random_state,
                                              assign_labels="kmeans").fit_predict(self.affinity_)
        elif self.method == "agglomerative":
            self.labels_ = AgglomerativeClustering(k, linkage="ward").fit_predict(self._features(profiles))
        elif self.method == "kmeans":
            self.labels_ = KMeans(k, random_state=self.random_state, n_init=10).fit_predict(self._features(profiles))
        else:
            self.labels_ = leiden(self.affinity_, self.neighbors, self.random_state)
        affinity, labels = self.affinity_, self.labels_
        if sparse:
            sample = np.sort(np.random.default_rng(self.random_state).choice(n, min(n, DIAGNOSTICS_SAMPLE),
                                                                             replace=False))
            affinity, labels = reference_affinity(similarity(profiles.subset(sample), self.combine)), labels[sample]
        self.diagnostics_ = {
            "method": self.method, "combine": self.combine, "embedding": self.embedding, "half_neurons": n,
            "similarity": f"sparse, {self.neighbors} nearest neighbours" if sparse else "dense",
            "k": int(self.labels_.max()) + 1, "suggested_k": self.suggested_k_,
            "silhouette": silhouette(affinity, labels),
            "intra_inter_ratio": intra_inter_ratio(affinity, labels),
        }
        return self

    def _features(self, profiles: HalfNeuronProfiles) -> np.ndarray:
        """Concatenated profiles, reduced by truncated SVD so Ward and k-means stay dense and small."""
        stacked = sp.hstack([profiles.inputs, profiles.outputs]).tocsr()
        components = min(50, stacked.shape[0] - 1, stacked.shape[1] - 1)
        if components < 2:
            return stacked.toarray()
        return TruncatedSVD(components, random_state=self.random_state).fit_transform(stacked)


def leiden(affinity: np.ndarray | sp.csr_matrix, n_neighbors: int, seed: int) -> np.ndarray:
    """Leiden communities of the symmetrised k-nearest-neighbour graph of the affinity."""
    import igraph
    import leidenalg

    n = affinity.shape[0]
    if sp.issparse(affinity):
        graph = sp.csr_matrix(affinity - sp.diags(affinity.diagonal())).tocoo()  # already the kNN graph
    else:
        graph = knn_graph(affinity, n_neighbors).tocoo()
    upper = graph.row < graph.col
    g = igraph.Graph(n=n, edges=list(zip(graph.row[upper].tolist(), graph.col[upper].tolist())))
    g.es["weight"] = graph.data[upper].tolist()
    partition = leidenalg.find_partition(g, leidenalg.RBConfigurationVertexPartition, weights="weight", seed=seed)
    return np.asarray(partition.membership)
