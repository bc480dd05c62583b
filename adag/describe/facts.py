"""What holds for a cluster across prompts, from the run's own tables: the roles of the prompt that drive
it and suppress it (adag.describe.inputs), where its nodes sit, its effects on the candidates in logits
(adag.describe.effects), its effect on the traced metric, how it differs from its nearest cluster, and
its label (adag.describe.labels). Every count is over all prompts of the run. The stats explainer's
one-line descriptions and label are read from these facts, so that they state the same thing."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from adag.describe.categories import Namer, slot_category
from adag.describe.effects import Effect, effects, output_line
from adag.describe.inputs import Coverage, InputRecord, coverage, input_line, role_context
from adag.describe.labels import tell_apart
from adag.describe.records import raw_inputs, raw_outputs
from adag.describe.roles import Roles, prompt_roles
from adag.view import first_counted_position, prompt_input_vectors


@dataclass
class ClusterFacts:
    cluster: int
    prompts: int  # prompts the cluster occurs in
    total: int  # prompts of the run: the denominator of every count
    inputs: list[Coverage]
    suppressors: list[Coverage]
    last_share: float  # of the cluster's nodes, at the last position
    own_share: float  # of its input attribution, from the node's own position
    layers: tuple[int, int, float]
    common: Effect | None  # every candidate moved together
    outputs: list[Effect]  # relative effects, strongest first
    metric: tuple[float, int, float | None]  # mean attribution per prompt, prompts positive, share of the metric
    half_neurons: int
    context: tuple[str, str] = ("", "")  # constant text before and after the strongest input role
    suppressor_context: tuple[str, str] = ("", "")
    nearest: str = ""
    label: str = ""

    def input_line(self) -> str:
        return input_line(self.inputs, self.total, self.context)

    def suppressor_line(self) -> str:
        return input_line(self.suppressors, self.total, self.suppressor_context, "top suppressor")

    def output_line(self) -> str:
        return output_line(self.common, self.outputs)

    def position_summary(self) -> str:
        return (f"{self.last_share:.0%} of its nodes at the last position; {self.own_share:.0%} of their input "
                f"from their own position, {1 - self.own_share:.0%} from earlier positions")

    def layer_summary(self) -> str:
        low, high, median = self.layers
        return f"layers {low}-{high} (median {median:g}), {self.half_neurons} half-neurons"

    def metric_summary(self) -> str:
        mean, positive, share = self.metric
        text = f"{mean:+.3g} per prompt on the traced metric (positive in {positive}/{self.total} prompts"
        return text + (f", {share:.0%} of the metric)" if share is not None else ")")

    def lines(self) -> list[str]:
        lines = [f"occurs in {self.prompts}/{self.total} prompts"]
        lines += [f"input: {c.phrase(self.total, 'top input')}" for c in self.inputs[:3]]
        lines += [f"suppressed by: {c.phrase(self.total, 'top suppressor')}" for c in self.suppressors[:2]]
        lines += [f"position: {self.position_summary()}", f"layers: {self.layer_summary()}"]
        effects_ = [*self.outputs[:3], *([self.common] if self.common else [])]
        lines += [f"output: {e.phrase()}" for e in effects_] or ["output: no output effect consistent across prompts"]
        lines.append(f"metric: {self.metric_summary()}")
        return lines + ([f"nearest: {self.nearest}"] if self.nearest else [])


def cluster_facts(nodes: pd.DataFrame, prompts: pd.DataFrame, node_cluster: np.ndarray, keep_first: bool,
                  roles: Roles | None = None, namer: Namer | None = slot_category) -> dict[int, ClusterFacts]:
    """Every cluster's facts, with its nearest cluster by inputs and its label; `namer` gives a slot's
    strings a category (None: none)."""
    roles = roles or prompt_roles(prompts)
    indexed = prompts.set_index("prompt")
    summed = prompt_input_vectors(nodes, node_cluster, keep_first)
    raw_out = raw_outputs(nodes, prompts)
    frame = pd.DataFrame({"cluster": node_cluster, "prompt": nodes["prompt"].to_numpy()})
    facts = {}
    for cluster, members in frame.groupby("cluster", sort=True).indices.items():
        if cluster < 0:
            continue
        positive, negative, outputs, attribution = [], [], [], {}
        for prompt, index in frame.iloc[members].groupby("prompt", sort=True).indices.items():
            rows, values = members[index], summed[int(cluster), int(prompt)]
            tokens = list(indexed.at[prompt, "tokens"])
            positive.append((tokens, roles.tokens[prompt], np.clip(values, 0, None)))
            negative.append((tokens, roles.tokens[prompt], np.clip(-values, 0, None)))
            outputs.append((list(indexed.at[prompt, "target_tokens"]), roles.targets[prompt], raw_out[rows].sum(0)))
            attribution[prompt] = float(nodes["attribution"].to_numpy()[rows].sum())
        facts[int(cluster)] = _one_cluster(int(cluster), nodes, members, indexed, keep_first, (positive, negative),
                                           outputs, attribution, namer)
    _contrast(facts)
    tell_apart(facts)
    return facts


def _one_cluster(cluster: int, nodes: pd.DataFrame, members: np.ndarray, indexed: pd.DataFrame, keep_first: bool,
                 inputs: tuple[list[InputRecord], list[InputRecord]], outputs: list, attribution: dict[int, float],
                 namer: Namer | None) -> ClusterFacts:
    positive, negative = inputs
    total = len(indexed)
    part = nodes.iloc[members]
    lengths = indexed["n_tokens"] if "n_tokens" in indexed else indexed["tokens"].map(len)
    last = (part["position"].to_numpy() == lengths.loc[part["prompt"].to_numpy()].to_numpy() - 1).mean()
    first, raw_in = first_counted_position(keep_first), raw_inputs(part)
    own = total_in = 0.0
    for values, position in zip(raw_in, part["position"].to_numpy()):
        values, position = np.abs(values[first:]), int(position) - first
        own += float(values[position]) if 0 <= position < len(values) else 0.0
        total_in += float(values.sum())
    layer = part["layer"].to_numpy()
    per_prompt = np.array(list(attribution.values()))
    share = None
    if "metric" in indexed:
        metrics = indexed["metric"].astype(float).loc[list(attribution)].to_numpy()
        share = float(per_prompt.sum() / metrics.sum()) if abs(metrics.sum()) > 1e-9 else None
    keys = part[["layer", "neuron"]].assign(sign=np.sign(part["activation"].to_numpy()))
    found, suppressors = coverage(positive, namer), coverage(negative, namer)
    common, relative = effects(outputs, total)
    return ClusterFacts(
        cluster, len(attribution), total, found, suppressors, float(last), own / total_in if total_in > 0 else 0.0,
        (int(layer.min()), int(layer.max()), float(np.median(layer))), common, relative,
        (float(per_prompt.mean()), int((per_prompt > 0).sum()), share), len(keys.drop_duplicates()),
        role_context(positive, found[0].role) if found else ("", ""),
        role_context(negative, suppressors[0].role) if suppressors else ("", ""))


def _contrast(facts: dict[int, ClusterFacts]) -> None:
    """Name each cluster's nearest cluster by input roles and how their main output effects differ."""
    roles = sorted({c.role for f in facts.values() for c in f.inputs})
    if len(facts) < 2 or not roles:
        return
    ids = sorted(facts)
    vectors = np.array([[next((c.share for c in facts[i].inputs if c.role == r), 0.0) for r in roles] for i in ids])
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    similarity = (vectors / np.where(norms > 0, norms, 1)) @ (vectors / np.where(norms > 0, norms, 1)).T
    np.fill_diagonal(similarity, -np.inf)
    for row, cluster in enumerate(ids):
        other = ids[int(np.argmax(similarity[row]))]
        mine, theirs = facts[cluster].outputs[:1], facts[other].outputs[:1]
        if mine and theirs and mine[0].role == theirs[0].role and mine[0].over == theirs[0].over:
            how = ("the same relative output effect" if mine[0].sign == theirs[0].sign else
                   f"the opposite relative output effect: it {theirs[0].phrase()}")
        elif theirs:
            how = f"a different relative output effect: it {theirs[0].phrase()}"
        else:
            how = "no consistent relative output effect"
        facts[cluster].nearest = (f"cluster {other} reads the most similar inputs (similarity "
                                  f"{similarity[row].max():.2f}) and has {how}")
