"""The output side of a cluster across prompts, in logits. A shift of all candidates together (the
common mode) leaves the choice among them unchanged (softmax is shift-invariant), so it is reported as
what it is, and what tells clusters apart is the relative effect: which candidates a cluster moves
against the others (each role relative to the mean of the other candidates; the answer against a slot
token). Every count is of prompts, over all prompts of the run."""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field

import numpy as np

from adag.describe.roles import role_phrase, role_words

CONSISTENT = 0.75  # an effect is reported when its sign holds in this share of the prompts it is measured in
UNIFORM = 2.0  # a prompt's candidates move together when |mean effect| exceeds this many standard deviations
WEAK = 0.2  # a relative effect under this share of the common mode's size (in logits) is called weak

OutputRecord = tuple[list[str], list[str], np.ndarray]  # candidates, their roles, effects in logits


@dataclass
class Effect:
    """One output finding across prompts: every candidate moved together (over "all"), or a role raised
    (sign +1) or lowered against the other candidates ("others") or against another role."""

    role: str
    over: str
    sign: int
    agree: int  # prompts where the sign holds
    measured: int  # prompts where it could be measured
    total: int  # prompts of the run
    mean: float  # mean effect per measured prompt, in logits (signed)
    examples: list[str] = field(default_factory=list)

    @property
    def strength(self) -> float:
        return abs(self.mean) * self.agree / max(self.total, 1)

    def words(self) -> str:
        if self.over == "all":
            return "all candidates"
        words = role_words(self.role)
        return f"{words} over {role_words(self.over)}" if self.over != "others" else words

    def phrase(self) -> str:
        verb = "raises" if self.sign > 0 else "lowers"
        measured = f", a candidate in {self.measured}" if self.measured < self.total and self.over != "all" else ""
        where = f"(in {self.agree}/{self.total} prompts{measured}, mean {self.mean:+.2f} logits)"
        if self.over == "all":
            return f"{verb} all candidates together {where}: how sure the model is, not which candidate it picks"
        over = "the other candidates" if self.over == "others" else role_phrase(self.over)
        return f"{verb} {role_phrase(self.role, self.examples)} over {over} {where}"


def effects(records: list[OutputRecord], total_prompts: int) -> tuple[Effect | None, list[Effect]]:
    """The common mode (None unless its sign is consistent) and the relative findings, strongest first.
    Each prompt gives one sample per finding (a role with several candidates in a prompt: their mean); a
    finding needs a consistent sign and to be measured in at least half the prompts."""
    samples: dict[tuple[str, str], list[float]] = defaultdict(list)
    strings: dict[str, Counter] = defaultdict(Counter)
    for targets, roles, values in records:
        if len(values) < 2:
            continue
        if abs(values.mean()) > UNIFORM * values.std():
            samples[("", "all")].append(float(values.mean()))
        prompt: dict[tuple[str, str], list[float]] = defaultdict(list)
        for i, (target, role) in enumerate(zip(targets, roles)):
            strings[role][target] += abs(float(values[i]))
            prompt[(role, "others")].append(float(values[i] - np.delete(values, i).mean()))
            if role == "answer":
                for j, other in enumerate(roles):
                    if other.startswith("slot"):
                        prompt[(role, other)].append(float(values[i] - values[j]))
        for key, found in prompt.items():
            samples[key].append(float(np.mean(found)))
    # Relative effects of candidates moved exactly together are rounding (float64, a few terms): no finding.
    floor = 1e-9 * max((float(np.abs(v).max(initial=0)) for _, _, v in records), default=0.0)
    findings = []
    for (role, over), values in samples.items():
        values = np.array(values)
        sign = 1 if values.mean() > 0 else -1
        agree = int((np.sign(values) == sign).sum())
        if len(values) * 2 >= max(total_prompts, 2) and agree >= CONSISTENT * len(values) \
                and abs(values.mean()) > floor:
            findings.append(Effect(role, over, sign, agree, len(values), total_prompts, float(values.mean()),
                                   [s for s, _ in strings[role].most_common(3)]))
    common = next((e for e in findings if e.over == "all"), None)
    return common, sorted((e for e in findings if e.over != "all"), key=lambda e: -e.strength)


def is_weak(relative: Effect, common: Effect | None) -> bool:
    """Whether a relative effect is small beside the common mode (both in logits per prompt)."""
    return common is not None and relative.strength < WEAK * common.strength


def leading(relative: list[Effect]) -> list[Effect]:
    """The strongest relative effect and the strongest one on another role: what a description states."""
    return relative[:1] + [e for e in relative[1:] if e.role != relative[0].role][:1]


def output_line(common: Effect | None, relative: list[Effect]) -> str:
    """One line: the three strongest relative effects and the leading ones (what changes the model's pick),
    then the common mode."""
    shown = relative[:3] + [e for e in leading(relative) if all(e is not f for f in relative[:3])]
    parts = [e.phrase() for e in shown]
    if relative and is_weak(relative[0], common):
        parts[0] = f"weak: {parts[0]}"
    parts += [common.phrase()] if common is not None else []
    return "; ".join(parts) or "no output effect consistent across prompts"
