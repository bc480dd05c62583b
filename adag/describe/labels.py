"""A cluster's label, from the same facts as its one-line descriptions: 'INPUT -> OUTPUT', where INPUT
names the strongest input role (a slot by its category or key, a constant token quoted) and OUTPUT the
cluster's relative effect on the candidates ('answer', '"The"', 'answer over country'), marked
'(weak)' when it is small beside the common mode; 'all candidates' only when nothing but the common
mode is consistent. `not[...]` says once that the effect lowers. Every word of a label is found in the
description beside it. Clusters whose labels clash get more of their own facts (a second input role or
the constant text around the first, a second effect, the top token string) before a layer tag."""

from __future__ import annotations

import json
import re
from collections import defaultdict
from typing import Protocol

from adag.describe.effects import Effect, is_weak, leading
from adag.describe.inputs import SECOND, Coverage
from adag.describe.roles import label_words, name_of


class ClusterFacts(Protocol):
    """What a label is built from (adag.describe.facts.ClusterFacts has it; no import back to it)."""

    cluster: int
    inputs: list[Coverage]
    context: tuple[str, str]
    common: Effect | None
    outputs: list[Effect]
    layers: tuple[int, int, float]
    label: str


def _input_parts(facts: ClusterFacts) -> list[str]:
    """The input part, from general to specific; each level only adds what the input line states."""
    if not facts.inputs:
        return [""]
    first = facts.inputs[0]
    parts = [first.words()]
    before, after = facts.context
    if before or after:
        parts.append(first.words() + "".join(f" {word} {name_of(near)}"
                                             for word, near in (("after", before), ("before", after)) if near))
    elif len(facts.inputs) > 1 and facts.inputs[1].share >= SECOND * first.share:
        parts.append(f"{first.words()} + {facts.inputs[1].words()}")
    if (first.role.startswith("slot:") or first.category) and first.examples:
        parts.append(f"{parts[-1]} {name_of(first.examples[0].strip())}")
    return parts


def _output_parts(facts: ClusterFacts) -> tuple[list[str], int]:
    """The output part from general to specific, and the sign it is said with."""
    if not facts.outputs:
        return (["all candidates"], facts.common.sign) if facts.common else ([""], 1)
    first = facts.outputs[0]
    weak = " (weak)" if is_weak(first, facts.common) else ""
    parts = [first.words() + weak]
    for second in leading(facts.outputs)[1:]:
        parts.append(f"{first.words()} & {'' if second.sign == first.sign else 'not '}{second.words()}{weak}")
    return parts, first.sign


def label_at(facts: ClusterFacts, inputs: int = 0, outputs: int = 0) -> str:
    """The label with its input part at detail `inputs` and its output part at detail `outputs` (each
    capped at the most detailed part the facts give)."""
    sources, (targets, sign) = _input_parts(facts), _output_parts(facts)
    source, target = sources[min(inputs, len(sources) - 1)], targets[min(outputs, len(targets) - 1)]
    text = f"{source} -> {target}" if source and target else source or target or "no consistent role"
    return text if sign > 0 or not target else f"not[{text}]"


QUOTED = re.compile(r'"(?:[^"\\]|\\.)*"')


def _quoted(text: str) -> set[str]:
    return {json.loads(q).strip() for q in QUOTED.findall(text)}


def grounded(label: str, description: str) -> bool:
    """Whether the label's input part (before '->', without not[...] and a layer tag) is found in the
    description: each quoted string quoted there too, each other word a word of it."""
    source = label.split(" @")[0].removeprefix("not[").removesuffix("]").split(" -> ")[0]
    bare = QUOTED.sub(" ", source)
    words = set(label_words(bare)) if bare.strip() else set()
    return _quoted(source) <= _quoted(description) and words <= set(label_words(QUOTED.sub(" ", description)))


def tell_apart(facts: dict[int, ClusterFacts]) -> None:
    """Give every cluster its most general label; clusters whose labels clash get the least added detail
    (output first, then input) that makes their labels differ. Where their facts give the same words at
    every detail, their layer range, else median layer, else number tells them apart."""
    groups = defaultdict(list)
    for item in facts.values():
        item.label = label_at(item)
        groups[item.label].append(item)
    details = sorted(((i, o) for i in range(4) for o in range(3)), key=lambda d: (sum(d), -d[1]))
    for same in (group for group in groups.values() if len(group) > 1):
        chosen = min(details, key=lambda d: -len({label_at(item, *d) for item in same}))  # first of the best
        for item in same:
            item.label = label_at(item, *chosen)
    _tag_layers(facts)


def _tag_layers(facts: dict[int, ClusterFacts]) -> None:
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
