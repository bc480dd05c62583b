"""The cluster stage: read the trace tables, cluster half-neurons, write clusters and the cluster graph."""

from __future__ import annotations

import numpy as np
import pandas as pd

from adag.cluster.config import CLUSTER_STAGE, ClusterConfig
from adag.cluster.graph import cluster_graph
from adag.cluster.methods import ProfileClustering
from adag.cluster.profiles import half_neuron_profiles
from adag.errors import AdagError
from adag.pipeline import StageResult, Summary, number, writing
from adag.store import RunDir

STAGE = CLUSTER_STAGE.name


def cluster_run(run_dir: str | RunDir, config: ClusterConfig) -> StageResult:
    """Cluster the traced half-neurons and build the cluster graph."""
    with writing(run_dir, CLUSTER_STAGE, config) as (view, out):
        nodes, prompts = view.nodes, view.prompts
        if nodes.empty:
            raise AdagError(f"{view.path} has no traced nodes to cluster; trace with a lower --threshold")
        profiles = half_neuron_profiles(nodes, prompts, config.views,
                                        keep_first_position=view.config("trace")["keep_first_position"])
        if config.k != "auto" and config.k > len(profiles):
            raise AdagError(f"--k {config.k} is more than the {len(profiles)} half-neurons traced in {view.path}; "
                            f"choose k from 2 to {len(profiles)}, or 'auto'")
        model = ProfileClustering(config.k, config.method, config.combine, config.embedding, config.seed,
                                  config.max_k, config.neighbors, config.dense_limit).fit(profiles)
        labels = _order_by_attribution(model.labels_, profiles.node_half_neuron, nodes["attribution"].to_numpy())
        node_cluster = labels[profiles.node_half_neuron]

        half_neurons = profiles.keys.assign(
            half_neuron=np.arange(len(profiles)), cluster=labels,
            nodes=np.bincount(profiles.node_half_neuron, minlength=len(profiles)),
            attribution=np.bincount(profiles.node_half_neuron, weights=nodes["attribution"], minlength=len(profiles)),
        )
        out.write_table("half_neurons", half_neurons)
        out.write_table("clusters", _cluster_summary(half_neurons, len(prompts)))
        for name, table in cluster_graph(nodes, view.edges, node_cluster, len(prompts)).items():
            out.write_table(name, table)
        diagnostics = {**model.diagnostics_, "eigenvalues": [round(float(v), 6) for v in model.eigenvalues_]}
        out.write_json("diagnostics", diagnostics)
        out.facts.update(clusters=diagnostics["k"], half_neurons=len(profiles),
                         suggested_k=diagnostics["suggested_k"], silhouette=diagnostics["silhouette"])
    return StageResult(view.run)


def cluster_summary(result: StageResult) -> Summary:
    run = result.run
    facts = run.manifest["stages"][STAGE]
    diagnostics = run.read_json(STAGE, "diagnostics")
    return Summary(f"clustered {facts['half_neurons']} half-neurons into {facts['clusters']} clusters in "
                   f"{facts['seconds']:.1f}s; eigengap suggests k={diagnostics['suggested_k']}, "
                   f"silhouette {number(diagnostics['silhouette'])}, "
                   f"intra/inter similarity {number(diagnostics['intra_inter_ratio'])}")


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
