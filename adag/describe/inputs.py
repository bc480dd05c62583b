"""The input side of a cluster across prompts: which roles drive it (adag.describe.roles), in how many
prompts each is the strongest, its share of the mass, its strongest token strings, a category for the
slot's strings, and the constant text next to the strongest role; and the one-line input description
built from them."""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Literal

import numpy as np

from adag.describe.categories import STRINGS, Namer, content_strings
from adag.describe.roles import name_of, role_phrase, role_words

SECOND = 0.25  # a second role is named only if it holds at least this share as much as the first
CONTEXT = 2  # tokens of constant neighbouring text looked for, on each side

InputRecord = tuple[list[str], list[str], np.ndarray]  # tokens, their roles, non-negative values


@dataclass
class Coverage:
    role: str
    top: int  # prompts where it is the strongest role
    share: float  # of the part's total mass
    examples: list[str]  # its strongest token strings
    category: str = ""  # a slot's category word (adag.describe.categories), where its strings share one

    def words(self) -> str:
        """Label words; a slot of no category or key by "slot" and its first shown content string."""
        if self.role == "slot" and not self.category and self.examples:
            shown = self.examples[:3]
            return f"slot {name_of((content_strings(shown) or [shown[0].strip() or shown[0]])[0])}"
        return role_words(self.role, self.category)

    def phrase(self, prompts: int, what: str) -> str:
        note = f"{what} in {self.top}/{prompts} prompts, {self.share:.0%} of it"
        return role_phrase(self.role, self.examples, note, self.category)


def coverage(records: list[InputRecord], namer: Namer | None = None) -> list[Coverage]:
    """Per role: in how many records it is the strongest role (a slot by its tokens together, as one filled
    value; a constant string by its strongest occurrence, as a token), its share of all the mass and its
    strongest token strings; slots get a category from `namer`. Strongest share first."""
    mass: dict[str, float] = defaultdict(float)
    top: Counter = Counter()
    strings: dict[str, Counter] = defaultdict(Counter)
    for tokens, roles, values in records:
        per_role: dict[str, float] = defaultdict(float)
        strongest: dict[str, float] = defaultdict(float)  # a slot's tokens together, a constant string's best one
        for token, role, value in zip(tokens, roles, values):
            if value > 0:
                per_role[role] += float(value)
                strings[role][token] += float(value)
                strongest[role] = per_role[role] if role.startswith("slot") else max(strongest[role], float(value))
        if per_role:
            top[max(strongest, key=strongest.get)] += 1
            for role, value in per_role.items():
                mass[role] += value
    total = sum(mass.values())
    found = [Coverage(role, top[role], value / total, [s for s, _ in strings[role].most_common(STRINGS)])
             for role, value in sorted(mass.items(), key=lambda item: -item[1])] if total > 0 else []
    for item in found[:2]:
        if item.role.startswith("slot") and namer is not None:
            item.category = namer(item.examples)
            if item.category:  # the strings it is read from first
                content = set(content_strings(item.examples))
                item.examples.sort(key=lambda s: s.strip() not in content)
    return found


def role_context(records: list[InputRecord], role: str) -> tuple[str, str]:
    """The constant text just before and just after the role's strongest token, in every record where
    the role occurs (at least two), or ''."""
    before, after = [], []
    for tokens, roles, values in records:
        at = [i for i, r in enumerate(roles) if r == role and values[i] > 0]
        if at:
            i = max(at, key=lambda j: values[j])
            start = stop = i
            while start > 0 and roles[start - 1] == role:
                start -= 1
            while stop + 1 < len(roles) and roles[stop + 1] == role:
                stop += 1
            before.append(tuple(tokens[max(0, start - CONTEXT):start]))
            after.append(tuple(tokens[stop + 1:stop + 1 + CONTEXT]))
    return common_context(before, "before"), common_context(after, "after")


def common_context(contexts: list[tuple[str, ...]], side: Literal["before", "after"]) -> str:
    """The longest text next to every occurrence (of at least two) on that side, or ''."""
    if len(contexts) < 2 or not all(contexts):
        return ""
    for size in range(min(len(c) for c in contexts), 0, -1):
        near = {c[-size:] if side == "before" else c[:size] for c in contexts}
        if len(near) == 1:
            return "".join(near.pop()).strip()
    return ""


def input_line(found: list[Coverage], prompts: int, context: tuple[str, str], what: str = "top input") -> str:
    """One line: the strongest role with its coverage over `prompts`, the constant text around it, or
    else a second role when it holds enough of the mass."""
    if not found:
        return ""
    first = found[0]
    text = first.phrase(prompts, what)
    text += "".join(f" {word} {name_of(near)}" for word, near in zip(("after", "before"), context) if near)
    if not any(context):  # a second role, where it cannot blur a context
        text += "".join(f"; {c.phrase(prompts, what)}" for c in found[1:2] if c.share >= SECOND * first.share)
    return text
