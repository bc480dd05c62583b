"""Clustering settings (pydantic only, so that the CLI can build its options without heavy imports).

The defaults reproduce the reference implementation (DESIGN.md section 7).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from adag.pipeline import Stage
from adag.settings import Seed, Settings

Method = Literal["spectral", "agglomerative", "kmeans", "leiden"]
Combine = Literal["harmonic", "mean", "input", "output"]
Views = Literal["raw", "share"]
Embedding = Literal["reference", "sklearn"]
# Defaults shared with adag.cluster.methods.ProfileClustering.
CLUSTERS, MAX_CLUSTERS, NEIGHBORS, DENSE_LIMIT = 20, 64, 30, 5000


class ClusterConfig(Settings):
    k: Annotated[int, Field(ge=2)] | Literal["auto"] = Field(
        CLUSTERS, description="number of clusters (at least 2), or 'auto' for the eigengap's suggestion")
    method: Method = Field("spectral", description="clustering method (spectral is the reference)")
    combine: Combine = Field("harmonic", description="harmonic or mean of the input and output views, "
                             "or one view alone")
    views: Views = Field("raw", description="raw: the reference's views, from raw contributions over the "
                         "positions that can hold nodes; share: the stored shares over every position (older)")
    embedding: Embedding = Field("reference", description="spectral embedding: reference (the reference's "
                                 "normalised-affinity eigenvectors) or sklearn (SpectralClustering, older)")
    seed: Seed = Field(0, description="random seed of the eigensolver start and k-means")
    max_k: int = Field(MAX_CLUSTERS, ge=2, description="largest k the eigengap may suggest")
    dense_limit: int = Field(DENSE_LIMIT, ge=2, description="above this many half-neurons, a sparse similarity "
                             "(nearest neighbours) and a sparse eigensolver replace the dense matrices")
    neighbors: int = Field(NEIGHBORS, ge=1, description="most similar half-neurons kept per half-neuron in the "
                           "sparse similarity and in leiden's graph")


CLUSTER_STAGE = Stage(
    "cluster", "Cluster traced half-neurons by their attribution profiles and build the cluster graph.",
    ClusterConfig, "adag.cluster.run:cluster_run", "adag.cluster.run:cluster_summary",
    requires=("trace",))
