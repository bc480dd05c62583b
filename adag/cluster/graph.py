"""The cluster graph: node and edge attributions summed over each cluster's members (DESIGN.md section 7).

Every edge of the trace is a direct effect (DESIGN.md section 6): neuron -> neuron, embedding ->
neuron (from the kept embedding nodes; the source is the position) and neuron -> logit. Embedding ->
logit edges touch no cluster and are left to the trace's tables.
"""

from __future__ import annotations

import numpy as np
import pandas as pd


def cluster_graph(nodes: pd.DataFrame, edges: pd.DataFrame | None, node_cluster: np.ndarray,
                  n_prompts: int) -> dict[str, pd.DataFrame]:
    """Per prompt: cluster attribution, cluster -> cluster edges (intra-cluster edges removed),
    attachments from input positions (embedding -> neuron edges) and to target logits (neuron ->
    logit edges); and the same averaged over prompts
    (a cluster absent from a prompt counts as 0 there)."""
    nodes = nodes.assign(cluster=node_cluster)
    per_prompt = nodes.groupby(["prompt", "cluster"], as_index=False)["attribution"].sum()
    tables = {"prompt_clusters": per_prompt}
    mean = per_prompt.groupby("cluster")["attribution"].sum() / n_prompts
    tables["mean_clusters"] = mean.rename("attribution").reset_index()
    if edges is None or edges.empty:
        return tables

    lookup = pd.Series(node_cluster, index=pd.MultiIndex.from_arrays([nodes["prompt"], nodes["node"]]))
    kinds = edges["source_kind"].astype(str), edges["target_kind"].astype(str)

    def cluster_of(prompt: pd.Series, node: pd.Series) -> np.ndarray:
        return lookup.reindex(pd.MultiIndex.from_arrays([prompt, node])).to_numpy()

    inner = edges[(kinds[0] == "neuron") & (kinds[1] == "neuron")]
    inner = inner.assign(source_cluster=cluster_of(inner["prompt"], inner["source"]),
                         target_cluster=cluster_of(inner["prompt"], inner["target"]))
    inner = inner[inner["source_cluster"] != inner["target_cluster"]]
    tables["cluster_edges"] = inner.groupby(["prompt", "source_cluster", "target_cluster"],
                                            as_index=False)["attribution"].sum()
    tables["mean_cluster_edges"] = (tables["cluster_edges"].groupby(["source_cluster", "target_cluster"])
                                    ["attribution"].sum().div(n_prompts).reset_index())

    inputs = edges[(kinds[0] == "embedding") & (kinds[1] == "neuron")]
    inputs = inputs.assign(cluster=cluster_of(inputs["prompt"], inputs["target"]))
    tables["input_attachments"] = (inputs.groupby(["prompt", "cluster", "source"], as_index=False)["attribution"]
                                   .sum().rename(columns={"source": "position"}))

    logits = edges[(kinds[0] == "neuron") & (kinds[1] == "logit")]
    logits = logits.assign(cluster=cluster_of(logits["prompt"], logits["source"]))
    tables["logit_attachments"] = (logits.groupby(["prompt", "cluster", "target"], as_index=False)["attribution"]
                                   .sum().rename(columns={"target": "target_rank"}))
    return tables
