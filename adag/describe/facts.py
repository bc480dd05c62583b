"""What holds for a cluster across prompts, from the run's own tables: the roles of the prompt that drive
it (with coverage over prompts), where its nodes sit, its effects on the candidates in logit units, its
effect on the traced metric, how it differs from its nearest cluster, and a short label built from roles.

Roles come from data available offline, never from what a dataset is about:
    slot:KEY      tokens of the user's text inside a metadata value (the filled slot, named by its key)
    slot          other tokens of the user's text that vary across prompts
    template:S    a token string S present in the shown part of every prompt (the prompt template)
    system        tokens before the user's text (a chat template's system prompt)
and for candidate next tokens: answer (the row's first label, or its metadata answer), alternative (a
further label), slot:KEY (the start of a metadata value), token:S (any other candidate, by string).
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from adag.describe.records import raw_inputs, raw_outputs, shown_start
from adag.view import first_counted_position, prompt_input_vectors

CONSISTENT = 0.75  # an output effect is reported when its sign holds in this share of the prompts it occurs in
PREFERRED = 0.25  # a label names a role effect over a stronger uniform one down to this share (token: twice)
UNIFORM = 2.0  # candidates move together when |mean effect| exceeds this many standard deviations across them


def _answers(labels, metadata: dict) -> list[str]:
    if labels is not None and len(labels):
        return [str(label) for label in labels]
    return [str(metadata["answer"])] if "answer" in metadata else []


def _spans(text: str, metadata: dict, skip: set[str]) -> list[tuple[int, int, str]]:
    """Character spans of the user's text holding a metadata value (not an answer), with its key."""
    spans = []
    for key, value in metadata.items():
        value = str(value).strip()
        if isinstance(metadata[key], (str, int, float)) and value and value not in skip and value in text:
            at = text.index(value)
            spans.append((at, at + len(value), key))
    return spans


def name_of(token: str) -> str:
    """A token string as shown in facts: quoted as JSON writes it."""
    return json.dumps(token, ensure_ascii=False)


@dataclass
class Roles:
    """The role of every token and of every candidate next token, per prompt."""

    tokens: dict[int, list[str]]
    targets: dict[int, list[str]]


def prompt_roles(prompts: pd.DataFrame) -> Roles:
    """Roles from the prompts table (prompt, text, tokens, metadata, labels, target_tokens)."""
    shown = {}
    for prompt, tokens, text in zip(prompts["prompt"], prompts["tokens"], prompts["text"]):
        tokens = list(tokens)
        shown[int(prompt)] = (tokens, text, shown_start(tokens, text))
    strings = [{t.strip() or t for t in tokens[start:]} for tokens, _, start in shown.values()]
    template = set.intersection(*strings) if len(strings) > 1 else set()
    token_roles, target_roles = {}, {}
    for row in prompts.itertuples():
        prompt = int(row.prompt)
        tokens, text, start = shown[prompt]
        metadata = json.loads(row.metadata) if isinstance(row.metadata, str) else dict(row.metadata or {})
        answers = _answers(getattr(row, "labels", None), metadata)
        joined = "".join(tokens)
        text_at = joined.rfind(text.strip()) if text.strip() else -1
        spans = [(text_at + a, text_at + b, key) for a, b, key in _spans(text, metadata, set(answers))] \
            if text_at >= 0 else []
        ends = np.cumsum([len(t) for t in tokens])
        roles = []
        for i, token in enumerate(tokens):
            begin, end = ends[i] - len(token), ends[i]
            key = next((k for a, b, k in spans if begin < b and end > a and token.strip()), None)
            if i < start:
                roles.append("system")
            elif key is not None:
                roles.append(f"slot:{key}")
            elif (token.strip() or token) in template:
                roles.append(f"template:{token.strip() or token}")
            else:
                roles.append("slot")
        token_roles[prompt] = roles
        slot_values = {k: str(v).strip() for k, v in metadata.items()
                       if isinstance(v, (str, int, float)) and str(v).strip() and str(v).strip() not in answers}
        target_roles[prompt] = [_target_role(t, answers, slot_values) for t in row.target_tokens]
    return Roles(token_roles, target_roles)


def _target_role(target: str, answers: list[str], slot_values: dict[str, str]) -> str:
    stripped = target.strip()
    if stripped:
        for i, answer in enumerate(answers):
            if answer.strip() == stripped or (answer.strip().startswith(stripped) and len(stripped) > 1):
                return "answer" if i == 0 else "alternative"
        for key, value in slot_values.items():
            if value.startswith(stripped) and len(stripped) > 1:
                return f"slot:{key}"
    return f"token:{target}"


def label_words(token: str) -> list[str]:
    """Lowercase words of a token string; a token without letters or digits is named by its symbols'
    Unicode names ("colon", "question-mark"), whitespace as "newline" or "space"."""
    words = re.findall(r"[a-z0-9]+", token.lower())
    if words:
        return words
    if token.strip():
        return [unicodedata.name(c, "symbol").lower().replace(" ", "-") for c in token.strip()]
    return ["newline" if "\n" in token else "space"]


def role_phrase(role: str, examples: list[str] | None = None, note: str = "") -> str:
    """A role in words with example token strings, then what it is and a note (e.g. its coverage) in
    parentheses: 'the country " France", " Japan" (filled slot; top input in 8/8 prompts)'."""
    kind, _, detail = role.partition(":")
    if kind == "token":
        return name_of(detail)
    name = {"slot": f"the {detail}" if detail else "the filled slot", "system": "the system prompt",
            "template": f"the template token {name_of(detail)}"}.get(kind, f"the {kind}")
    if examples and kind not in ("template", "system"):
        name += " " + ", ".join(name_of(e) for e in examples[:3])
    what = {"slot": "filled slot" if detail else "tokens that vary across prompts",
            "template": "in every prompt"}.get(kind, "")
    inside = [part for part in (what, note) if part]
    return f"{name} ({'; '.join(inside)})" if inside else name


def role_words(role: str) -> str:
    """A role in one or two label words."""
    kind, _, detail = role.partition(":")
    if kind == "slot":
        return " ".join(label_words(detail)[:2]) if detail else "slot"
    if kind in ("template", "token"):
        return " ".join(label_words(detail)[:2])
    return "system prompt" if kind == "system" else kind


@dataclass
class Coverage:
    role: str
    top: int  # prompts where it is the strongest role
    share: float  # of the part's total mass
    examples: list[str]


def coverage(records: list[tuple[list[str], list[str], np.ndarray]]) -> list[Coverage]:
    """Per role, over (tokens, roles, non-negative values) records: in how many it is the strongest role,
    its share of all the mass, and its strongest token strings. Strongest share first."""
    mass: dict[str, float] = defaultdict(float)
    top: Counter = Counter()
    strings: dict[str, Counter] = defaultdict(Counter)
    for tokens, roles, values in records:
        per_role: dict[str, float] = defaultdict(float)
        for token, role, value in zip(tokens, roles, values):
            if value > 0:
                per_role[role] += float(value)
                strings[role][token] += float(value)
        if per_role:
            top[max(per_role, key=per_role.get)] += 1
            for role, value in per_role.items():
                mass[role] += value
    total = sum(mass.values())
    return [Coverage(role, top[role], value / total, [s for s, _ in strings[role].most_common(3)])
            for role, value in sorted(mass.items(), key=lambda item: -item[1])] if total > 0 else []


@dataclass
class Effect:
    """One output finding across prompts: a role raised (sign +1) or lowered over others, in logits."""

    role: str
    over: str  # what it is raised over: "others", "all" (every candidate together) or another role
    sign: int
    agree: int  # prompts where the sign holds
    prompts: int  # prompts where it could be measured
    mean: float  # mean effect in logits (signed)
    examples: list[str] = field(default_factory=list)

    @property
    def strength(self) -> float:
        return abs(self.mean) * self.agree / max(self.prompts, 1)

    def words(self) -> str:
        if self.over == "all":
            return "all candidates"
        words = role_words(self.role)
        return f"{words} over {role_words(self.over)}" if self.over != "others" else words


def effects(records: list[tuple[list[str], list[str], np.ndarray]], total_prompts: int) -> list[Effect]:
    """Output findings over (targets, roles, effects in logits) records, strongest first: every candidate
    moved together; each role raised or lowered relative to the other candidates; the answer against
    each slot token. A finding needs a consistent sign and to occur in at least half the prompts."""
    samples: dict[tuple[str, str], list[float]] = defaultdict(list)
    strings: dict[str, Counter] = defaultdict(Counter)
    for targets, roles, values in records:
        if len(values) > 1 and abs(values.mean()) > UNIFORM * values.std():
            samples[("", "all")].append(float(values.mean()))
        for i, (target, role) in enumerate(zip(targets, roles)):
            strings[role][target] += abs(float(values[i]))
            if len(values) > 1:
                samples[(role, "others")].append(float(values[i] - np.delete(values, i).mean()))
        for i, role in enumerate(roles):
            for j, other in enumerate(roles):
                if role == "answer" and other.startswith("slot"):
                    samples[(role, other)].append(float(values[i] - values[j]))
    found = []
    for (role, over), values in samples.items():
        values = np.array(values)
        sign = 1 if values.mean() > 0 else -1
        agree = int((np.sign(values) == sign).sum())
        if len(values) * 2 >= max(total_prompts, 2) and agree >= CONSISTENT * len(values) and values.mean() != 0:
            found.append(Effect(role, over, sign, agree, len(values), float(values.mean()),
                                [s for s, _ in strings[role].most_common(3)]))
    return sorted(found, key=lambda e: -e.strength)


def effect_phrase(effect: Effect) -> str:
    verb = "raises" if effect.sign > 0 else "lowers"
    where = f"(in {effect.agree}/{effect.prompts} prompts, mean {effect.mean:+.2f} logits)"
    if effect.over == "all":
        return f"{verb} all candidates together {where}"
    over = "the other candidates" if effect.over == "others" else role_phrase(effect.over)
    return f"{verb} {role_phrase(effect.role, effect.examples)} over {over} {where}"


@dataclass
class ClusterFacts:
    cluster: int
    prompts: int  # prompts the cluster occurs in
    inputs: list[Coverage]
    suppressors: list[Coverage]
    last_share: float  # of the cluster's nodes, at the last position
    own_share: float  # of its input attribution, from the node's own position
    layers: tuple[int, int, float]
    outputs: list[Effect]
    metric: tuple[float, int, float | None]  # mean attribution per prompt, prompts positive, share of the metric
    half_neurons: int
    nearest: str = ""
    label: str = ""

    def input_summary(self) -> str:
        return _roles_summary(self.inputs, self.prompts, "top input")

    def position_summary(self) -> str:
        return (f"{self.last_share:.0%} of its nodes at the last position; {self.own_share:.0%} of their input "
                f"from their own position, {1 - self.own_share:.0%} from earlier positions")

    def layer_summary(self) -> str:
        low, high, median = self.layers
        return f"layers {low}-{high} (median {median:g}), {self.half_neurons} half-neurons"

    def output_summary(self) -> str:
        return "; ".join(effect_phrase(e) for e in self.outputs[:3]) or "no output effect consistent across prompts"

    def metric_summary(self) -> str:
        mean, positive, share = self.metric
        text = f"{mean:+.3g} per prompt on the traced metric (positive in {positive}/{self.prompts} prompts"
        return text + (f", {share:.0%} of the metric)" if share is not None else ")")

    def lines(self) -> list[str]:
        lines = [f"input: {_coverage_phrase(c, self.prompts, 'top input')}" for c in self.inputs[:3]]
        lines += [f"suppressed by: {_coverage_phrase(c, self.prompts, 'top suppressor')}" for c in self.suppressors[:2]]
        lines += [f"position: {self.position_summary()}", f"layers: {self.layer_summary()}"]
        lines += [f"output: {effect_phrase(e)}" for e in self.outputs[:3]] or ["output: " + self.output_summary()]
        lines.append(f"metric: {self.metric_summary()}")
        return lines + ([f"nearest: {self.nearest}"] if self.nearest else [])


def _coverage_phrase(c: Coverage, prompts: int, what: str) -> str:
    return f"{role_phrase(c.role, c.examples, f'{what} in {c.top}/{prompts} prompts, {c.share:.0%} of it')}"


def _roles_summary(items: list[Coverage], prompts: int, what: str) -> str:
    shown = [c for c in items[:3] if c.top or c is items[0]]
    return "; ".join(_coverage_phrase(c, prompts, what) for c in shown)


def cluster_facts(nodes: pd.DataFrame, prompts: pd.DataFrame, node_cluster: np.ndarray, keep_first: bool,
                  roles: Roles | None = None) -> dict[int, ClusterFacts]:
    """Every cluster's facts, with its nearest cluster by inputs and its label."""
    roles = roles or prompt_roles(prompts)
    raw_in, raw_out = raw_inputs(nodes), raw_outputs(nodes, prompts)
    indexed = prompts.set_index("prompt")
    lengths = indexed["n_tokens"] if "n_tokens" in indexed else indexed["tokens"].map(len)
    metric = indexed["metric"].astype(float) if "metric" in indexed else None
    first = first_counted_position(keep_first)
    summed_inputs = prompt_input_vectors(nodes, node_cluster, keep_first)
    facts = {}
    frame = pd.DataFrame({"cluster": node_cluster, "prompt": nodes["prompt"].to_numpy()})
    for cluster, members in frame.groupby("cluster", sort=True).indices.items():
        if cluster < 0:
            continue
        positive, negative, outputs, attribution = [], [], [], {}
        for prompt, index in frame.iloc[members].groupby("prompt", sort=True).indices.items():
            rows = members[index]
            summed = summed_inputs[int(cluster), int(prompt)]
            tokens = list(indexed.at[prompt, "tokens"])
            positive.append((tokens, roles.tokens[prompt], np.clip(summed, 0, None)))
            negative.append((tokens, roles.tokens[prompt], np.clip(-summed, 0, None)))
            outputs.append((list(indexed.at[prompt, "target_tokens"]), roles.targets[prompt], raw_out[rows].sum(0)))
            attribution[prompt] = float(nodes["attribution"].to_numpy()[rows].sum())
        part = nodes.iloc[members]
        last = (part["position"].to_numpy() == lengths.loc[part["prompt"].to_numpy()].to_numpy() - 1).mean()
        own = total = 0.0
        for i in members:
            values = np.abs(raw_in[i][first:])
            position = int(nodes["position"].iat[i]) - first
            own += float(values[position]) if 0 <= position < len(values) else 0.0
            total += float(values.sum())
        layer = part["layer"].to_numpy()
        per_prompt = np.array(list(attribution.values()))
        share = None
        if metric is not None:
            metrics = metric.loc[list(attribution)].to_numpy()
            share = float(per_prompt.sum() / metrics.sum()) if abs(metrics.sum()) > 1e-9 else None
        keys = part[["layer", "neuron"]].assign(sign=np.sign(part["activation"].to_numpy()))
        facts[int(cluster)] = ClusterFacts(
            int(cluster), len(attribution), coverage(positive), coverage(negative), float(last),
            own / total if total > 0 else 0.0, (int(layer.min()), int(layer.max()), float(np.median(layer))),
            effects(outputs, len(attribution)), (float(per_prompt.mean()), int((per_prompt > 0).sum()), share),
            len(keys.drop_duplicates()))
    _contrast(facts)
    for item in facts.values():
        item.label = role_label(item.inputs, item.outputs)
    _tell_apart(facts)
    return facts


def _tell_apart(facts: dict[int, ClusterFacts]) -> None:
    """Clusters whose roles give the same label are told apart by where they sit: their layer range, else
    their median layer, else their number, so that no two clusters of a run read alike."""
    for suffix in (lambda f: f"L{f.layers[0]}-{f.layers[1]}", lambda f: f"L{f.layers[2]:g}",
                   lambda f: f"#{f.cluster}"):
        groups = defaultdict(list)
        for item in facts.values():
            groups[item.label.split(" @")[0]].append(item)
        clashes = [same for same in groups.values() if len({item.label for item in same}) < len(same)]
        if not clashes:
            return
        for same in clashes:
            for item in same:
                item.label = f"{item.label.split(' @')[0]} @{suffix(item)}"


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
            how = ("the same output effect" if mine[0].sign == theirs[0].sign else
                   f"the opposite output effect: it {effect_phrase(theirs[0])}")
        elif theirs:
            how = f"a different output effect: it {effect_phrase(theirs[0])}"
        else:
            how = "no consistent output effect"
        facts[cluster].nearest = (f"cluster {other} reads the most similar inputs (similarity "
                                  f"{similarity[row].max():.2f}) and has {how}")


def role_label(inputs: list[Coverage], outputs: list[Effect]) -> str:
    """1-3 words from roles: 'INPUT -> OUTPUT' ('answer over country' when the answer is raised over a slot
    token), 'not[...]' when that effect lowers it, 'INPUT cue' without a consistent effect. What a cluster
    does to the answer or a slot is preferred to moving all candidates together, and both to a single
    token string, when strong enough; the sign is said once, by `not[...]`."""
    source = role_words(inputs[0].role) if inputs else ""
    ranked = sorted(outputs, key=lambda e: (e.role.startswith("token:") * 2 + (e.over == "all"), -e.strength))
    # Lowering one token raises the others relative to it: a role effect must be half as strong to
    # be named over a single token, a quarter as strong over moving every candidate together.
    share = PREFERRED if outputs and outputs[0].over == "all" else 2 * PREFERRED
    effect = next((e for e in ranked if e.strength >= share * outputs[0].strength), None)
    if effect is None:
        cue = " cue" if inputs and inputs[0].role.startswith("template") else ""
        return f"{source}{cue}" or "no consistent role"
    target = effect.words()
    if " over " not in target and source:
        if len(f"{source} {target}".split()) > 3:
            source, target = source.split()[0], " ".join(target.split()[:2])
        target = f"{source} -> {target}"
    return target if effect.sign > 0 else f"not[{target}]"
