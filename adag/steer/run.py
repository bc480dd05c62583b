"""The steer stage: sweeps over clusters and multipliers, random controls, faithfulness, judged generation."""

from __future__ import annotations

from typing import Literal

import numpy as np
import pandas as pd
import torch
from pydantic import BaseModel, ConfigDict, Field
from tqdm.auto import tqdm

from adag.cluster.run import node_clusters
from adag.errors import AdagError
from adag.models import LoadedModel, load_model
from adag.steer.evaluate import effect, faithfulness_curve, last_logits, metric_value, prompt_batches
from adag.steer.intervene import HalfNeuron, replaced, scaled
from adag.steer.plots import plot_sweep
from adag.store import RunDir

STAGE = "steer"


class SteerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    clusters: list[int] | None = None  # None: every cluster (a sweep)
    multipliers: list[float] = Field(default_factory=lambda: [0.0, 1.0, 2.0])
    positions: Literal["all", "traced"] = "all"
    controls: int = Field(0, ge=0, description="random same-size, same-layer sets per cluster (ablation)")
    batch_size: int = Field(8, ge=1)
    seed: int = 0


def run_model(run: RunDir, spec: str | None = None) -> LoadedModel:
    """The run's model (or `spec`), refusing one whose weights differ from the traced model's."""
    lm = load_model(spec or run.manifest["model"]["spec"])
    if lm.weights_hash != run.manifest["model"]["weights"]:
        raise AdagError(f"model weights differ from those traced in {run.path} "
                        f"({lm.weights_hash} vs {run.manifest['model']['weights']}); steer with the traced model")
    return lm


def cluster_members(run: RunDir) -> dict[int, list[HalfNeuron]]:
    half = run.read_table("cluster", "half_neurons")
    return {int(c): list(zip(g["layer"].tolist(), g["neuron"].tolist(), g["polarity"].tolist()))
            for c, g in half.groupby("cluster")}


def steer_run(run_dir: str, config: SteerConfig, lm: LoadedModel | None = None, progress: bool = True) -> RunDir:
    run = RunDir.open(run_dir)
    run.require_stage("cluster", "adag cluster")
    lm = lm or run_model(run)
    run.begin_stage(STAGE, config.model_dump(mode="json"), resume=False)
    prompts = run.read_table("trace", "prompts")
    members = cluster_members(run)
    clusters = config.clusters if config.clusters is not None else sorted(members)
    unknown = set(clusters) - set(members)
    if unknown:
        raise AdagError(f"no cluster {sorted(unknown)} in {run_dir}; clusters are 0..{max(members)}")
    batches = prompt_batches(lm, prompts, config.batch_size)
    references = [last_logits(lm, batch) for _, batch in batches]
    traced = _traced_positions(run, batches) if config.positions == "traced" else None

    frames = []
    bar = tqdm(total=len(clusters) * len(config.multipliers), desc="steer", unit="setting", disable=not progress)
    for cluster in clusters:
        for multiplier in config.multipliers:
            for b, ((rows, batch), reference) in enumerate(zip(batches, references)):
                where = traced[cluster][b] if traced else None
                steered = last_logits(lm, batch, scaled(lm.model, lm.adapter, members[cluster], multiplier, where))
                frames.append(effect(lm, rows, reference, steered).assign(cluster=cluster, multiplier=multiplier))
            bar.update()
    bar.close()
    results = pd.concat(frames, ignore_index=True)
    run.write_table(STAGE, "results", results)
    summary = results.groupby(["cluster", "multiplier"], as_index=False)[
        ["p_top", "p_targets", "logit_change", "kl"]].mean()
    run.write_table(STAGE, "summary", summary)
    plot_sweep(summary, run.path / STAGE / "plots")
    facts = {"settings": len(clusters) * len(config.multipliers)}
    if config.controls:
        controls = ablation_controls(lm, batches, references, members, clusters, config.controls, config.seed,
                                     progress)
        run.write_table(STAGE, "controls", controls)
        facts["controls"] = config.controls
    run.finish_stage(STAGE, **facts)
    return run


def _traced_positions(run: RunDir, batches) -> dict[int, list[torch.Tensor]]:
    """Per cluster and batch, a (B, T) mask of the positions where a member was traced."""
    nodes = run.read_table("trace", "nodes", columns=["prompt", "layer", "neuron", "position", "activation"])
    half = run.read_table("cluster", "half_neurons")
    nodes = nodes.assign(cluster=node_clusters(nodes, half))
    out: dict[int, list[torch.Tensor]] = {int(c): [] for c in half["cluster"].unique()}
    for rows, batch in batches:
        row_of = {int(p): i for i, p in enumerate(rows["prompt"])}
        for cluster in out:
            mask = torch.zeros(batch.input_ids.shape, dtype=torch.bool)
            hits = nodes[(nodes["cluster"] == cluster) & nodes["prompt"].isin(row_of)]
            r = torch.as_tensor(hits["prompt"].map(row_of).to_numpy(copy=True))
            mask[r, batch.offsets.cpu()[r] + torch.as_tensor(hits["position"].to_numpy(copy=True))] = True
            out[cluster].append(mask)
    return out


def ablation_controls(lm: LoadedModel, batches, references, members: dict[int, list[HalfNeuron]],
                      clusters: list[int], n_controls: int, seed: int, progress: bool = True) -> pd.DataFrame:
    """Ablate each cluster and `n_controls` random half-neuron sets of the same size drawn from the same
    layers (same polarity); report the drop in mean probability of the original top answer and the
    cluster's percentile among the controls."""
    rng = np.random.default_rng(seed)
    baseline = _mean_p_top(lm, batches, references, None)
    rows = []
    for cluster in tqdm(clusters, desc="controls", unit="cluster", disable=not progress):
        drop = baseline - _mean_p_top(lm, batches, references, members[cluster])
        control_drops = np.array([baseline - _mean_p_top(lm, batches, references,
                                                          _random_like(members[cluster], lm.n_neurons, rng))
                                  for _ in range(n_controls)])
        rows.append({"cluster": cluster, "size": len(members[cluster]), "drop": drop,
                     "control_mean": control_drops.mean(), "control_std": control_drops.std(),
                     "percentile": float((control_drops < drop).mean() * 100), "controls": n_controls})
    return pd.DataFrame(rows)


def _random_like(half_neurons: list[HalfNeuron], n_neurons: int, rng: np.random.Generator) -> list[HalfNeuron]:
    out = []
    for layer in sorted({h[0] for h in half_neurons}):
        same_layer = [h for h in half_neurons if h[0] == layer]
        neurons = rng.choice(n_neurons, size=len(same_layer), replace=False)
        out += [(layer, int(n), h[2]) for n, h in zip(neurons, same_layer)]
    return out


def _mean_p_top(lm, batches, references, half_neurons: list[HalfNeuron] | None) -> float:
    values = []
    for (rows, batch), reference in zip(batches, references):
        steered = reference if half_neurons is None else last_logits(
            lm, batch, scaled(lm.model, lm.adapter, half_neurons, 0.0))
        values.append(effect(lm, rows, reference, steered)["p_top"].to_numpy())
    return float(np.concatenate(values).mean())


def faithfulness_run(run_dir: str, fractions: list[float], ablation: Literal["zero", "mean"] = "zero",
                     lm: LoadedModel | None = None, batch_size: int = 8) -> pd.DataFrame:
    """Faithfulness and completeness of node circuits made of the top fraction of traced nodes by
    |attribution|; every other neuron is zero- or mean-ablated."""
    run = RunDir.open(run_dir)
    run.require_stage("trace", "adag trace")
    lm = lm or run_model(run)
    prompts = run.read_table("trace", "prompts")
    nodes = run.read_table("trace", "nodes", columns=["prompt", "layer", "position", "neuron", "attribution"])
    batches = prompt_batches(lm, prompts, batch_size)
    means = _mean_activations(lm, batches) if ablation == "mean" else None

    def value_of(fraction: float | None, complement: bool) -> float:
        total = 0.0
        for rows, batch in batches:
            if fraction is None:
                total += metric_value(last_logits(lm, batch), rows).sum()
                continue
            keep = _circuit_mask(lm, nodes, rows, batch, fraction, complement)
            base = {layer: (means[layer] if means is not None else torch.zeros(())) for layer in keep}
            total += metric_value(last_logits(lm, batch, replaced(lm.model, lm.adapter, keep, base)), rows).sum()
        return total

    curve = faithfulness_curve(fractions, value_of)
    if run.stage_done("trace"):
        run.write_table(STAGE, f"faithfulness_{ablation}", curve)
    return curve


def _circuit_mask(lm, nodes, rows, batch, fraction, complement) -> dict[int, torch.Tensor]:
    """Per layer, (B, T, N) True where a neuron stays: the prompt's top `fraction` of traced nodes by
    |attribution| (or, for the complement, everything else)."""
    keep = {layer: torch.zeros((*batch.input_ids.shape, lm.n_neurons), dtype=torch.bool)
            for layer in range(lm.n_layers)}
    for row, prompt in enumerate(rows["prompt"]):
        mine = nodes[nodes["prompt"] == prompt]
        count = int(round(fraction * len(mine)))
        top = mine.reindex(mine["attribution"].abs().sort_values(ascending=False).index).head(count)
        offset = int(batch.offsets[row])
        for layer, group in top.groupby("layer"):
            positions = offset + group["position"].to_numpy(copy=True)
            keep[int(layer)][row, positions, group["neuron"].to_numpy(copy=True)] = True
    if complement:
        keep = {layer: ~mask for layer, mask in keep.items()}
    return keep


def _mean_activations(lm: LoadedModel, batches) -> dict[int, torch.Tensor]:
    """Each neuron's mean activation over every real token of the run's prompts."""
    from adag.trace.tap import NeuronTap

    sums = {layer: torch.zeros(lm.n_neurons) for layer in range(lm.n_layers)}
    count = 0
    for _, batch in batches:
        with torch.no_grad(), NeuronTap(lm.model, lm.adapter) as tap:
            last_logits(lm, batch)
        valid = batch.valid
        for layer in sums:
            sums[layer] += tap.activations[layer][valid].float().sum(0).cpu()
        count += int(valid.sum())
    return {layer: total / count for layer, total in sums.items()}
