"""The steer and faithfulness stages: sweeps over clusters and multipliers, random controls, circuit faithfulness."""

from __future__ import annotations

from typing import get_args

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from adag.errors import AdagError
from adag.half_neurons import HalfNeuron
from adag.models import LoadedModel, run_model
from adag.pipeline import StageResult, Summary, needed, writing
from adag.steer.config import (
    FAITHFULNESS_STAGE,
    STEER_STAGE,
    ControlKind,
    FaithfulnessConfig,
    MeasureConfig,
    SteerConfig,
)
from adag.steer.controls import TracedPool, layer_control, percentile
from adag.steer.evaluate import effect, faithfulness_curve, last_logits, metric_value, prompt_batches
from adag.steer.intervene import replaced, scaled
from adag.steer.measure import Measure
from adag.steer.plots import plot_sweep
from adag.store import DamagedFile, RunDir
from adag.subsets import kept_clusters
from adag.view import RunView

STAGE = STEER_STAGE.name
CLUSTER_TABLES = ("results", "summary", "controls", "control_draws")  # one row group per cluster


def steer_run(run_dir: str | RunDir, config: SteerConfig, model: str | None = None, lm: LoadedModel | None = None,
              progress: bool = True) -> StageResult:
    """Scale each chosen cluster by each multiplier and measure the answer; with `controls`, steer
    random same-size sets the same way and rank the cluster's change of the measure among theirs.
    The measure is the measure stage's where the run has one, else p_top. `model` names another copy
    of the run's model, `lm` passes one already loaded. Steering some clusters adds them to a finished
    steer made with the same settings (adag.subsets)."""
    settled = {}

    def recorded(view: RunView) -> SteerConfig:
        record, settled["chosen"], settled["finished"] = _added_to_finished(view, config)
        return record

    with writing(run_dir, STEER_STAGE, recorded) as (view, out):
        chosen, finished = settled["chosen"], settled["finished"]
        todo = [cluster for cluster in chosen if cluster not in finished.get("kept", ())]
        if not todo and view.run.entry(STAGE)["config"] == out.config:
            out.cancel()  # every cluster asked for is there, made with these settings: nothing changes
            return StageResult(view.run)
        _sweep(view, out, config, todo, finished, model, lm, progress)
    return StageResult(view.run)


def _added_to_finished(view: RunView, config: SteerConfig) -> tuple[SteerConfig, list[int], dict]:
    """The config to record, the clusters asked for, and the finished tables whose clusters a steer of some
    clusters keeps (adag.subsets): the config records the union of their clusters (None for all)."""
    for name in needed(STEER_STAGE, config):
        view.require(name)
    chosen = chosen_clusters(view, config)
    finished = _finished_tables(view)
    held = {int(c) for c in finished["summary"]["cluster"]} if finished else set()
    union = sorted(held | set(chosen))
    record = config.model_copy(update={"clusters": None if union == sorted(view.cluster_members) else union,
                                       "top": None})
    kept = kept_clusters(view.run, STEER_STAGE, config, record, {"clusters", "top"}, set(chosen), held,
                         "steer every cluster with the new settings (without --clusters or --top)")
    return (record, chosen, finished | {"kept": kept}) if kept else (config, chosen, {})


def _finished_tables(view: RunView) -> dict[str, pd.DataFrame]:
    """The finished steer's tables by name (none when it has none, or one of them is damaged: then
    everything is steered again)."""
    try:
        tables = {name: view.table(STAGE, name) for name in CLUSTER_TABLES}
    except DamagedFile:
        return {}
    return {name: table for name, table in tables.items() if table is not None}


def _sweep(view: RunView, out, config: SteerConfig, clusters: list[int], finished: dict, model: str | None,
           lm: LoadedModel | None, progress: bool) -> None:
    """Steer `clusters` and write the tables, with the rows of the finished clusters kept."""
    members = view.cluster_members
    measure_config = _measure_config(view)
    if measure_config.measure == "judge" and config.positions == "traced":
        raise AdagError("a judge measure steers generations, which have no traced positions; use --positions all")
    lm = lm or run_model(view.model, model)
    measure = Measure(lm, view.prompts, measure_config)
    batches = prompt_batches(lm, view.prompts, config.batch_size)
    references = [last_logits(lm, batch) for _, batch in batches]
    traced = _traced_positions(view, batches) if config.positions == "traced" else None
    unsteered = _unsteered(measure, batches, references).set_index("prompt")["value"]

    frames = []
    bar = tqdm(total=len(clusters) * len(config.multipliers), desc="steer", unit="setting", disable=not progress)
    for cluster in clusters:
        for multiplier in config.multipliers:
            frames.append(_sweep_setting(lm, measure, batches, references, unsteered, members[cluster],
                                         multiplier, traced[cluster] if traced else None).assign(
                cluster=cluster, multiplier=multiplier))
            bar.update()
    bar.close()
    results = pd.concat(frames, ignore_index=True)
    _check_finite(results)
    summary = results.groupby(["cluster", "multiplier"], as_index=False)[
        ["p_top", "p_targets", "logit_change", "kl", "measure"]].mean()
    tables = {"results": results, "summary": summary}
    baseline = None
    if config.controls:
        baseline = float(unsteered.mean())
        pool = TracedPool.from_nodes(view.node_keys, config.control_bins, lm.n_neurons) \
            if "traced" in config.control_kinds else None
        tables["controls"], tables["control_draws"] = compare_controls(
            lm, measure, batches, baseline, summary, members, clusters, config, pool, traced, progress)
    for name, table in tables.items():
        tables[name] = _with_kept(table, finished.get(name), clusters)
        out.write_table(name, tables[name])
    out.facts.update(settings=tables["summary"]["cluster"].nunique() * len(config.multipliers),
                     measure=measure_config.measure)
    if config.controls:
        out.facts["controls"] = config.controls
    plot_sweep(tables["summary"], measure_config.measure, out.file("plots"), tables.get("control_draws"), baseline)


def _with_kept(table: pd.DataFrame, finished: pd.DataFrame | None, steered: list[int]) -> pd.DataFrame:
    """`table` with the finished rows of the clusters not steered now, in cluster order."""
    if finished is None:
        return table
    kept = finished[~finished["cluster"].isin(steered)]
    return pd.concat([kept, table], ignore_index=True).sort_values("cluster", kind="stable", ignore_index=True)


def _check_finite(results: pd.DataFrame) -> None:
    """Steering that overflowed the model (inf or NaN logits) is an error, not a table of NaN."""
    effects = results[["p_top", "p_targets", "logit_change", "kl"]].to_numpy(dtype=float)
    bad = ~np.isfinite(effects).all(axis=1)
    if bad.any():
        row = results[bad].iloc[0]
        raise AdagError(f"steering cluster {int(row['cluster'])} by {row['multiplier']:g} gave non-finite logits "
                        "(the model overflowed); use smaller --multipliers")


def chosen_clusters(view: RunView, config: SteerConfig) -> list[int]:
    """--clusters as given, the --top clusters most correlated with the measure, or every cluster."""
    if config.clusters is not None:
        view.check_clusters(config.clusters)
        return config.clusters
    if config.top is None:
        return sorted(view.cluster_members)
    table = view.table("correlate", "correlation")  # SteerConfig.needs it with --top
    statistic = table[view.config("correlate")["method"]]
    ranked = table.loc[statistic.abs().dropna().sort_values(ascending=False, kind="stable").index, "cluster"]
    return [int(c) for c in ranked.head(config.top)]


def _measure_config(view: RunView) -> MeasureConfig:
    """The run's measure (refusing a stale one), or p_top where it has none."""
    if view.run.entry("measure") is None:
        return MeasureConfig(measure="p_top")
    return MeasureConfig(**view.config("measure"))


def _unsteered(measure: Measure, batches, references) -> pd.DataFrame:
    if not measure.uses_logits:
        return measure.values(batches)
    return pd.DataFrame({"prompt": np.concatenate([rows["prompt"].to_numpy() for rows, _ in batches]),
                         "value": np.concatenate([measure.of_logits(reference, rows)
                                                  for (rows, _), reference in zip(batches, references)])})


def _sweep_setting(lm: LoadedModel, measure: Measure, batches, references, unsteered: pd.Series,
                   half_neurons: list[HalfNeuron], multiplier: float,
                   positions: list[torch.Tensor] | None) -> pd.DataFrame:
    """One cluster at one multiplier: the effects on every prompt and the measure. Multiplier 1 is the
    unsteered model, so it reuses the reference logits and the `unsteered` measure."""
    frames = []
    for b, ((rows, batch), reference) in enumerate(zip(batches, references)):
        steered = reference if multiplier == 1 else last_logits(
            lm, batch, scaled(lm.model, lm.adapter, half_neurons, multiplier, positions[b] if positions else None))
        frames.append(effect(lm, rows, reference, steered).assign(
            measure=measure.of_logits(steered, rows) if measure.uses_logits and multiplier != 1 else np.nan))
    results = pd.concat(frames, ignore_index=True)
    if multiplier == 1:
        results["measure"] = results["prompt"].map(unsteered).to_numpy()
    elif not measure.uses_logits:
        judged = measure.values(batches, half_neurons, multiplier).set_index("prompt")["value"]
        results["measure"] = results["prompt"].map(judged).to_numpy()
    return results


def steer_summary(result: StageResult) -> Summary:
    run = result.run
    view = RunView(run)
    lines = [view.table(STAGE, "summary").round(4).to_string(index=False)]
    if view.has(STAGE, "controls"):
        lines.append(view.table(STAGE, "controls").round(4).to_string(index=False))
    lines.append(f"plots in {run.path / STAGE / 'plots'}")
    return Summary("\n".join(lines))


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


def compare_controls(lm: LoadedModel, measure: Measure, batches, baseline: float, summary: pd.DataFrame,
                     members: dict[int, list[HalfNeuron]], clusters: list[int], config: SteerConfig,
                     pool: TracedPool | None, traced: dict[int, list[torch.Tensor]] | None,
                     progress: bool = True) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Steer `config.controls` random sets of each kind like each cluster (same size and layers, same
    multipliers, the cluster's positions) and rank the cluster's change of the mean measure among
    theirs. Returns one row per cluster, kind and multiplier (change, the controls' mean and spread,
    percentile, and the share of traced-control draws that left their layer and bin), and every
    draw's change. Multiplier 1 steers nothing and is left out."""
    multipliers = [m for m in config.multipliers if m != 1]
    cluster_mean = summary.set_index(["cluster", "multiplier"])["measure"]
    rows, draws = [], []
    bar = tqdm(total=len(clusters) * len(config.control_kinds) * config.controls, desc="controls", unit="set",
               disable=not progress)
    for cluster in clusters:
        size = len(members[cluster])
        for kind in config.control_kinds:
            rng = np.random.default_rng([config.seed, cluster, get_args(ControlKind).index(kind)])
            changes: dict[float, list[float]] = {m: [] for m in multipliers}
            unmatched = 0
            for draw in range(config.controls):
                if kind == "traced":
                    control, missed = pool.draw(members[cluster], rng)
                    unmatched += missed
                else:
                    control = layer_control(members[cluster], lm.n_neurons, rng)
                for multiplier in multipliers:
                    value = measure.values(batches, control, multiplier, traced[cluster] if traced else None)
                    changes[multiplier].append(float(value["value"].mean()) - baseline)
                    draws.append({"cluster": cluster, "kind": kind, "multiplier": multiplier, "draw": draw,
                                  "change": changes[multiplier][-1]})
                bar.update()
            for multiplier in multipliers:
                control_changes = np.array(changes[multiplier])
                change = float(cluster_mean[(cluster, multiplier)]) - baseline
                rows.append({"cluster": cluster, "kind": kind, "multiplier": multiplier, "size": size,
                             "baseline": baseline, "change": change, "control_mean": control_changes.mean(),
                             "control_std": control_changes.std(),
                             "percentile": percentile(change, control_changes), "controls": config.controls,
                             "unmatched": unmatched / (size * config.controls)})
    bar.close()
    return pd.DataFrame(rows), pd.DataFrame(draws)


def faithfulness_run(run_dir: str | RunDir, config: FaithfulnessConfig, model: str | None = None,
                     lm: LoadedModel | None = None) -> StageResult:
    """Faithfulness and completeness of node circuits made of the top fraction of traced nodes by
    |attribution|; every other neuron is zero- or mean-ablated. Written to RUN/faithfulness/."""
    with writing(run_dir, FAITHFULNESS_STAGE, config) as (view, out):
        lm = lm or run_model(view.model, model)
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
    return StageResult(view.run, table=curve)


def faithfulness_summary(result: StageResult) -> Summary:
    return Summary(result.table.round(4).to_string(index=False))


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
