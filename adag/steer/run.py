"""The steer and faithfulness stages: sweeps over clusters and multipliers, random controls, circuit faithfulness."""

from __future__ import annotations

from typing import Literal

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from adag.errors import AdagError
from adag.models import LoadedModel, load_model
from adag.stages import writing
from adag.steer.config import FaithfulnessConfig, SteerConfig
from adag.steer.evaluate import effect, faithfulness_curve, last_logits, metric_value, prompt_batches
from adag.steer.intervene import HalfNeuron, replaced, scaled
from adag.steer.plots import plot_sweep
from adag.store import RunDir
from adag.view import RunView

STAGE = "steer"


def run_model(run: RunDir, spec: str | None = None) -> LoadedModel:
    """The run's model (or `spec`), refusing one whose weights differ from the traced model's."""
    lm = load_model(spec or run.manifest["model"]["spec"])
    if lm.weights_hash != run.manifest["model"]["weights"]:
        raise AdagError(f"model weights differ from those traced in {run.path} "
                        f"({lm.weights_hash} vs {run.manifest['model']['weights']}); steer with the traced model")
    return lm


def cluster_members(run: RunDir) -> dict[int, list[HalfNeuron]]:
    return RunView(run).cluster_members


def steer_run(run_dir: str | RunDir, config: SteerConfig, model: str | None = None, lm: LoadedModel | None = None,
              progress: bool = True) -> RunDir:
    """Scale each chosen cluster by each multiplier; with `controls`, compare its ablation with random
    same-size sets. `model` names another copy of the run's model, `lm` passes one already loaded."""
    with writing(run_dir, STAGE, config) as (view, out):
        members = view.cluster_members
        clusters = config.clusters if config.clusters is not None else sorted(members)
        view.check_clusters(clusters)
        lm = lm or run_model(view.run, model)
        batches = prompt_batches(lm, view.prompts, config.batch_size)
        references = [last_logits(lm, batch) for _, batch in batches]
        traced = _traced_positions(view, batches) if config.positions == "traced" else None

        frames = []
        bar = tqdm(total=len(clusters) * len(config.multipliers), desc="steer", unit="setting",
                   disable=not progress)
        for cluster in clusters:
            for multiplier in config.multipliers:
                for b, ((rows, batch), reference) in enumerate(zip(batches, references)):
                    where = traced[cluster][b] if traced else None
                    steered = last_logits(lm, batch, scaled(lm.model, lm.adapter, members[cluster], multiplier, where))
                    frames.append(effect(lm, rows, reference, steered).assign(cluster=cluster, multiplier=multiplier))
                bar.update()
        bar.close()
        results = pd.concat(frames, ignore_index=True)
        out.write_table("results", results)
        summary = results.groupby(["cluster", "multiplier"], as_index=False)[
            ["p_top", "p_targets", "logit_change", "kl"]].mean()
        out.write_table("summary", summary)
        plot_sweep(summary, out.file("plots"))
        out.facts["settings"] = len(clusters) * len(config.multipliers)
        if config.controls:
            controls = ablation_controls(lm, batches, references, members, clusters, config.controls, config.seed,
                                         progress)
            out.write_table("controls", controls)
            out.facts["controls"] = config.controls
    return view.run


def steer_summary(run: RunDir, run_dir: str) -> str:
    view = RunView(run)
    lines = [view.table(STAGE, "summary").round(4).to_string(index=False)]
    if view.has(STAGE, "controls"):
        lines.append(view.table(STAGE, "controls").round(4).to_string(index=False))
    lines.append(f"plots in {run.path / STAGE / 'plots'}")
    return "\n".join(lines)


def _traced_positions(view: RunView, batches) -> dict[int, list[torch.Tensor]]:
    """Per cluster and batch, a (B, T) mask of the positions where a member was traced."""
    by_cluster = dict(tuple(view.node_keys.groupby("cluster")))
    out: dict[int, list[torch.Tensor]] = {cluster: [] for cluster in view.cluster_members}
    for rows, batch in batches:
        row_of = {int(p): i for i, p in enumerate(rows["prompt"])}
        for cluster, masks in out.items():
            mask = torch.zeros(batch.input_ids.shape, dtype=torch.bool)
            hits = by_cluster[cluster]
            hits = hits[hits["prompt"].isin(row_of)]
            r = torch.as_tensor(hits["prompt"].map(row_of).to_numpy(copy=True))
            mask[r, batch.offsets.cpu()[r] + torch.as_tensor(hits["position"].to_numpy(copy=True))] = True
            masks.append(mask)
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


def faithfulness_run(run_dir: str | RunDir, fractions: list[float], ablation: Literal["zero", "mean"] = "zero",
                     lm: LoadedModel | None = None, batch_size: int = 8) -> pd.DataFrame:
    """Faithfulness and completeness of node circuits made of the top fraction of traced nodes by
    |attribution|; every other neuron is zero- or mean-ablated. Written to RUN/faithfulness/."""
    config = FaithfulnessConfig(fractions=fractions, ablation=ablation, batch_size=batch_size)
    return faithfulness_stage(run_dir, config, lm=lm)


def faithfulness_stage(run_dir: str | RunDir, config: FaithfulnessConfig, model: str | None = None,
                       lm: LoadedModel | None = None) -> pd.DataFrame:
    with writing(run_dir, "faithfulness", config) as (view, out):
        lm = lm or run_model(view.run, model)
        batches = prompt_batches(lm, view.prompts, config.batch_size)
        means = _mean_activations(lm, batches) if config.ablation == "mean" else None
        ranked = {prompt: nodes.reindex(nodes["attribution"].abs().sort_values(ascending=False).index)
                  for prompt, nodes in view.nodes_by_prompt.items()}

        def value_of(fraction: float | None, complement: bool) -> float:
            total = 0.0
            for rows, batch in batches:
                if fraction is None:
                    total += metric_value(last_logits(lm, batch), rows).sum()
                    continue
                keep = _circuit_mask(lm, ranked, rows, batch, fraction, complement)
                base = {layer: (means[layer] if means is not None else torch.zeros(())) for layer in keep}
                total += metric_value(last_logits(lm, batch, replaced(lm.model, lm.adapter, keep, base)), rows).sum()
            return total

        curve = faithfulness_curve(config.fractions, value_of)
        out.write_table("curve", curve)
    return curve


def faithfulness_summary(curve: pd.DataFrame, run_dir: str) -> str:
    return curve.round(4).to_string(index=False)


def _circuit_mask(lm, ranked: dict[int, pd.DataFrame], rows, batch, fraction, complement) -> dict[int, torch.Tensor]:
    """Per layer, (B, T, N) True where a neuron stays: the prompt's top `fraction` of traced nodes by
    |attribution| (`ranked` holds each prompt's nodes in that order), or, for the complement,
    everything else."""
    keep = {layer: torch.zeros((*batch.input_ids.shape, lm.n_neurons), dtype=torch.bool)
            for layer in range(lm.n_layers)}
    for row, prompt in enumerate(rows["prompt"]):
        mine = ranked[int(prompt)]
        top = mine.head(int(round(fraction * len(mine))))
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
