"""The cluster stage: read the trace tables, cluster half-neurons, write clusters and the cluster graph."""

from __future__ import annotations

from typing import Annotated, Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from adag.cluster.graph import cluster_graph
from adag.cluster.methods import (
    CLUSTERS,
    DENSE_LIMIT,
    MAX_CLUSTERS,
    NEIGHBORS,
    Embedding,
    Method,
    ProfileClustering,
)
from adag.cluster.profiles import HALF_NEURON_KEY, Views, half_neuron_keys, half_neuron_profiles
from adag.cluster.similarity import Combine
from adag.errors import AdagError
from adag.store import RunDir

STAGE = "cluster"


class ClusterConfig(BaseModel):
    """Clustering settings; defaults reproduce the reference implementation (DESIGN.md section 7)."""

    model_config = ConfigDict(extra="forbid")

    k: Annotated[int, Field(ge=2)] | Literal["auto"] = Field(
        CLUSTERS, description="number of clusters (at least 2), or 'auto' for the eigengap's suggestion")
    method: Method = Field("spectral", description="spectral, agglomerative (Ward), kmeans or leiden")
    combine: Combine = Field("harmonic", description="harmonic or mean of the input and output views, "
                             "or one view alone: input, output")
    views: Views = Field("raw", description="raw: the reference's views, from raw contributions over the "
                         "positions that can hold nodes; share: the stored shares over every position")
    embedding: Embedding = Field("reference", description="spectral embedding: reference (the reference's "
                                 "normalised-affinity eigenvectors) or sklearn (SpectralClustering)")
    seed: int = Field(0, description="random seed of the eigensolver start and k-means")
    max_k: int = Field(MAX_CLUSTERS, ge=2, description="largest k the eigengap may suggest")
    dense_limit: int = Field(DENSE_LIMIT, ge=2, description="above this many half-neurons, use a sparse similarity "
                             "(nearest neighbours) and a sparse eigensolver instead of dense matrices")
    neighbors: int = Field(NEIGHBORS, ge=1, description="most similar half-neurons kept per half-neuron in the sparse "
                           "similarity and in leiden's graph")


def cluster_run(run_dir: str, config: ClusterConfig) -> RunDir:
    run = RunDir.open(run_dir)
    run.require_stage("trace", "adag trace")
    run.begin_stage(STAGE, config.model_dump(mode="json"), resume=False)
    nodes = run.read_table("trace", "nodes")
    prompts = run.read_table("trace", "prompts")
    if nodes.empty:
        raise AdagError(f"{run_dir} has no traced nodes to cluster; trace with a lower --threshold")
    edges = run.read_table("trace", "edges") if run.stage_config("trace").get("edges") else None

    profiles = half_neuron_profiles(nodes, prompts, config.views,
                                    keep_first_position=run.stage_config("trace").get("keep_first_position", False))
    if config.k != "auto" and config.k > len(profiles):
        raise AdagError(f"--k {config.k} is more than the {len(profiles)} half-neurons traced in {run_dir}; "
                        f"choose k from 2 to {len(profiles)}, or 'auto'")
    model = ProfileClustering(config.k, config.method, config.combine, config.embedding, config.seed, config.max_k,
                              config.neighbors, config.dense_limit).fit(profiles)
    labels = _order_by_attribution(model.labels_, profiles.node_half_neuron, nodes["attribution"].to_numpy())
    node_cluster = labels[profiles.node_half_neuron]

    half_neurons = profiles.keys.assign(
        half_neuron=np.arange(len(profiles)), cluster=labels,
        nodes=np.bincount(profiles.node_half_neuron, minlength=len(profiles)),
        attribution=np.bincount(profiles.node_half_neuron, weights=nodes["attribution"], minlength=len(profiles)),
    )
    run.write_table(STAGE, "half_neurons", half_neurons)
    run.write_table(STAGE, "clusters", _cluster_summary(half_neurons, len(prompts)))
    for name, table in cluster_graph(nodes, edges, node_cluster, len(prompts)).items():
        run.write_table(STAGE, name, table)
    diagnostics = {**model.diagnostics_, "eigenvalues": [round(float(v), 6) for v in model.eigenvalues_]}
    run.write_json(STAGE, "diagnostics", diagnostics)
    run.finish_stage(STAGE, clusters=diagnostics["k"], half_neurons=len(profiles),
                     suggested_k=diagnostics["suggested_k"], silhouette=diagnostics["silhouette"])
    return run


def node_clusters(nodes: pd.DataFrame, half_neurons: pd.DataFrame) -> np.ndarray:
    """The cluster of each row of the trace stage's nodes table (-1 for a half-neuron left unclustered)."""
    merged = half_neuron_keys(nodes).merge(half_neurons[[*HALF_NEURON_KEY, "cluster"]], on=HALF_NEURON_KEY,
                                           how="left")
    return merged["cluster"].fillna(-1).astype(int).to_numpy()


def _order_by_attribution(labels: np.ndarray, node_half_neuron: np.ndarray, attribution: np.ndarray) -> np.ndarray:
    """Renumber clusters so that cluster 0 has the largest total |attribution|."""
    totals = np.bincount(labels[node_half_neuron], weights=np.abs(attribution), minlength=labels.max() + 1)
    rank = np.empty_like(totals, dtype=int)
    rank[np.argsort(-totals, kind="stable")] = np.arange(len(totals))
    return rank[labels]


def _cluster_summary(half_neurons: pd.DataFrame, n_prompts: int) -> pd.DataFrame:
    grouped = half_neurons.groupby("cluster")
    return pd.DataFrame({
        "cluster": grouped.size().index,
        "size": grouped.size().to_numpy(),
        "mean_layer": grouped["layer"].mean().to_numpy(),
        "min_layer": grouped["layer"].min().to_numpy(),
        "max_layer": grouped["layer"].max().to_numpy(),
        "excitatory_share": grouped["polarity"].apply(lambda p: float((p > 0).mean())).to_numpy(),
        "mean_attribution": (grouped["attribution"].sum() / n_prompts).to_numpy(),
    })
