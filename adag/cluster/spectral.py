"""Spectral clustering exactly as the reference implementation does it (DESIGN.md section 7).

A = max(S, 0) with diagonal 1; d = row sums of A; N = D^-1/2 A D^-1/2 with its diagonal set to 1;
the k eigenvectors of N with the largest eigenvalues; rows scaled to unit length; k-means with
n_init = 10 and a fixed seed. Dense matrices use a dense symmetric eigendecomposition, sparse ones
(the kNN similarity of large runs) ARPACK. The diagnostics below read the same A and N.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from scipy.linalg import eigh
from scipy.sparse.linalg import eigsh
from sklearn.cluster import KMeans

Matrix = np.ndarray | sp.csr_matrix


def reference_affinity(similarity: Matrix) -> Matrix:
    """A = max(S, 0) with diagonal 1, as float64."""
    if sp.issparse(similarity):
        return _with_unit_diagonal(sp.csr_matrix(similarity.maximum(0), dtype=np.float64))
    affinity = np.clip(similarity, 0, None).astype(np.float64)
    np.fill_diagonal(affinity, 1.0)
    return affinity


def normalised_affinity(affinity: Matrix) -> Matrix:
    """N = D^-1/2 A D^-1/2 with its diagonal set to 1."""
    scale = 1 / np.sqrt(np.asarray(affinity.sum(axis=1)).ravel())
    if sp.issparse(affinity):
        return _with_unit_diagonal(sp.diags(scale) @ affinity @ sp.diags(scale))
    normalised = affinity * scale[:, None] * scale[None, :]
    np.fill_diagonal(normalised, 1.0)
    return normalised


def _with_unit_diagonal(matrix: sp.spmatrix) -> sp.csr_matrix:
    return sp.csr_matrix(matrix - sp.diags(matrix.diagonal()) + sp.identity(matrix.shape[0]))


def top_eigenvectors(normalised: Matrix, count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The `count` largest eigenvalues (descending) and their eigenvectors, each eigenvector's sign
    chosen so that its largest-magnitude entry is positive (eigh's signs are arbitrary)."""
    n = normalised.shape[0]
    count = min(count, n)
    if sp.issparse(normalised) and count < n - 1:
        start = np.random.default_rng(seed).uniform(-1, 1, n)
        values, vectors = eigsh(normalised, k=count, which="LA", v0=start)
    else:
        dense = normalised.toarray() if sp.issparse(normalised) else normalised
        values, vectors = eigh(dense, subset_by_index=[n - count, n - 1])
    order = np.argsort(-values, kind="stable")
    values, vectors = values[order], vectors[:, order]
    signs = np.sign(vectors[np.abs(vectors).argmax(axis=0), np.arange(count)])
    return values, vectors * np.where(signs == 0, 1, signs)


def embedding_labels(vectors: np.ndarray, k: int, seed: int) -> np.ndarray:
    """k-means (n_init 10, fixed seed) on the first k eigenvectors, rows scaled to unit length."""
    embedding = vectors[:, :k]
    norms = np.linalg.norm(embedding, axis=1, keepdims=True)
    embedding = np.divide(embedding, norms, out=np.zeros_like(embedding), where=norms > 0)
    return KMeans(k, n_init=10, random_state=seed).fit_predict(embedding)


def eigengap(values: np.ndarray, max_k: int) -> int:
    """The k in 2..max_k after whose eigenvalue the gap to the next is largest (1 if too few)."""
    values = values[:max_k + 1]
    if len(values) < 3:
        return 1
    gaps = values[1:-1] - values[2:]  # gap after the k-th eigenvalue, k = 2..len-1
    return int(np.argmax(gaps)) + 2


def silhouette(affinity: Matrix, labels: np.ndarray) -> float | None:
    """Mean silhouette with distance 1 - A between different half-neurons (0 to itself); the same
    number as sklearn's silhouette_score on that dense distance, from per-cluster sums of A."""
    sizes = np.bincount(labels)
    if not 2 <= len(sizes) <= len(labels) - 1:
        return None
    per_cluster = _per_cluster_sums(affinity, labels)
    own = per_cluster[np.arange(len(labels)), labels] - affinity.diagonal()
    own_size = sizes[labels]
    inside = 1 - np.divide(own, own_size - 1, out=np.zeros_like(own), where=own_size > 1)
    other_mean = per_cluster / sizes
    other_mean[np.arange(len(labels)), labels] = -np.inf
    nearest = 1 - other_mean.max(axis=1)
    largest = np.maximum(inside, nearest)
    scores = np.divide(nearest - inside, largest, out=np.zeros_like(largest), where=largest > 0)
    return float(np.where(own_size > 1, scores, 0.0).mean())


def intra_inter_ratio(affinity: Matrix, labels: np.ndarray) -> float | None:
    """Mean A over pairs of different half-neurons in one cluster over the mean over pairs across clusters."""
    n, sizes = len(labels), np.bincount(labels)
    block_sums = _onehot(labels).T @ _per_cluster_sums(affinity, labels)  # (k, k) sums of A over cluster pairs
    intra_pairs, inter_pairs = (sizes ** 2).sum() - n, n * n - (sizes ** 2).sum()
    intra = np.trace(block_sums) - affinity.diagonal().sum()
    inter = block_sums.sum() - np.trace(block_sums)
    if not intra_pairs or not inter_pairs or inter == 0:
        return None
    return float((intra / intra_pairs) / (inter / inter_pairs))


def _onehot(labels: np.ndarray) -> sp.csr_matrix:
    return sp.csr_matrix((np.ones(len(labels)), (np.arange(len(labels)), labels)))


def _per_cluster_sums(affinity: Matrix, labels: np.ndarray) -> np.ndarray:
    """(H, k): row h's total affinity to the members of each cluster (itself included)."""
    sums = affinity @ _onehot(labels)
    return sums.toarray() if sp.issparse(sums) else np.asarray(sums)
