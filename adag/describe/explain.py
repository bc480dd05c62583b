"""Explainers write candidate descriptions of a cluster from highlighted excerpts; the simulator scores them.

Two explainers share one interface: `LLMExplainer` asks a chat model (worked examples, then the
excerpts), `StatsExplainer` writes a deterministic summary of the same excerpts without any model.
Either way every description is scored the same way, by the simulator on held-out records.
"""

from __future__ import annotations

import json
import re
import unicodedata
from abc import ABC, abstractmethod
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeVar

import numpy as np
from scipy.stats import pearsonr

from adag.describe.prompts import explain_messages, label_messages, parse_description, parse_label
from adag.describe.records import highlight
from adag.llm.backends import CachedBackend, make_backend
from adag.llm.roles import UnusableReply, parse_spec
from adag.llm.simulation import Simulation

Kind = Literal["input", "output"]
T = TypeVar("T")


@dataclass
class Scored:
    description: str
    score: float | None


@dataclass
class Excerpt:
    """A record as the explainer sees it: its tokens and which of them are highlighted."""

    tokens: list[str]
    marked: np.ndarray

    def render(self) -> str:
        return highlight(self.tokens, self.marked)


@dataclass
class TargetExcerpt:
    """A prompt with the cluster's push on each candidate next token, as integers in [-10, 10]."""

    prompt: str
    targets: list[str]
    scores: np.ndarray

    def render(self) -> str:
        return f"Prompt: {self.prompt!r} -> " + ", ".join(f"{t!r}: {int(s)}" for t, s in zip(self.targets, self.scores))


@dataclass
class HeldOut:
    """What descriptions are scored on: records the explainer never saw, with the true value of each
    unit (token or target) and, for output records, the prompt the targets follow."""

    units: list[list[str]]
    truth: list[np.ndarray]
    prompts: list[str] | None = None

    def __len__(self) -> int:
        return len(self.units)


def retry(attempts: int, ask: Callable[[int], T]) -> T:
    """Ask again (with the attempt number, so nothing cached is replayed) while the reply is unusable."""
    for attempt in range(attempts - 1):
        try:
            return ask(attempt)
        except UnusableReply:
            pass
    return ask(attempts - 1)


class Explainer(ABC):
    # A deterministic explainer writes one description from all excerpts instead of samples on subsets.
    deterministic: bool = False

    def bounded(self, seconds: float) -> Explainer:
        """The same explainer, giving up after `seconds` (for explainers that wait on a server)."""
        return self

    @abstractmethod
    def describe(self, kind: Kind, excerpts: list, sample: int, attempt: int) -> str:
        """One description of what makes the cluster fire (input) or what it makes the model say (output)."""

    @abstractmethod
    def label(self, descriptions: dict[Kind, str], excerpts: dict[Kind, list], attempt: int) -> str:
        """A 1-3 word lowercase label."""


class LLMExplainer(Explainer):
    def __init__(self, llm: CachedBackend, temperature: float):
        self.llm, self.temperature = llm, temperature

    def bounded(self, seconds: float) -> LLMExplainer:
        return LLMExplainer(self.llm.bounded(seconds), self.temperature)

    def describe(self, kind: Kind, excerpts: list, sample: int, attempt: int) -> str:
        messages = explain_messages(kind, [e.render() for e in excerpts])
        reply = self.llm.complete(messages, f"explain-{kind}", temperature=self.temperature, max_tokens=60,
                                  sample=sample, attempt=attempt, accept=lambda c: parse_description(c.text))
        return parse_description(reply.text)

    def label(self, descriptions: dict[Kind, str], excerpts: dict[Kind, list], attempt: int) -> str:
        reply = self.llm.complete(label_messages(descriptions["input"], descriptions["output"]), "label",
                                  max_tokens=12, attempt=attempt, accept=lambda c: parse_label(c.text))
        return parse_label(reply.text)


class StatsExplainer(Explainer):
    """No model: the token strings highlighted most often (with counts, and the text just before or after
    them when it is always the same), the targets promoted and suppressed most, and a label from the
    dominant strings."""

    deterministic = True
    SHOWN = 4  # token strings listed in a description, at most
    SHARE = 0.25  # listed only if highlighted (or pushed) at least this share as much as the top one
    CONTEXT = 2  # tokens of constant neighbouring text looked for, on each side

    def describe(self, kind: Kind, excerpts: list, sample: int, attempt: int) -> str:
        return self._inputs(excerpts) if kind == "input" else self._outputs(excerpts)

    def _inputs(self, excerpts: list[Excerpt]) -> str:
        runs = highlighted_runs(excerpts, self.CONTEXT)
        counts = Counter(run.text for run in runs)
        if not counts:
            return ""
        most = counts.most_common(1)[0][1]
        top = [s for s, n in counts.most_common(self.SHOWN) if n >= self.SHARE * most]
        listed = [run for run in runs if run.text in top]
        text = ", ".join(f"{quote(s)} ({counts[s]})" for s in top)
        for word, context in (("after", common_context([r.before for r in listed], "before")),
                              ("before", common_context([r.after for r in listed], "after"))):
            text += f" {word} {quote(context)}" if context else ""
        return text

    def _outputs(self, excerpts: list[TargetExcerpt]) -> str:
        promoted, suppressed = pushed_targets(excerpts, self.SHARE)
        clauses = [f"{verb} " + ", ".join(quote(t) for t in targets[:self.SHOWN])
                   for verb, targets in (("promotes", promoted), ("suppresses", suppressed)) if targets]
        return "; ".join(clauses)

    def label(self, descriptions: dict[Kind, str], excerpts: dict[Kind, list], attempt: int) -> str:
        counts = Counter(run.text for run in highlighted_runs(excerpts.get("input", []), self.CONTEXT))
        promoted, _ = pushed_targets(excerpts.get("output", []), self.SHARE)
        words = [w for s, _ in counts.most_common(2) for w in label_words(s)]
        words += [w for t in promoted[:1] for w in label_words(t)]
        return " ".join(list(dict.fromkeys(words))[:3]) or "no strong tokens"


def quote(token: str) -> str:
    """A token string in double quotes, with its spaces and escapes visible (as JSON writes it)."""
    return json.dumps(token, ensure_ascii=False)


@dataclass
class Run:
    """Consecutive highlighted tokens of one excerpt, with the tokens just before and after them."""

    text: str
    before: tuple[str, ...]
    after: tuple[str, ...]


def highlighted_runs(excerpts: list[Excerpt], context: int) -> list[Run]:
    runs = []
    for excerpt in excerpts:
        marked = np.flatnonzero(excerpt.marked)
        for group in np.split(marked, np.flatnonzero(np.diff(marked) > 1) + 1) if len(marked) else []:
            start, stop = group[0], group[-1] + 1
            runs.append(Run("".join(excerpt.tokens[start:stop]), tuple(excerpt.tokens[max(0, start - context):start]),
                            tuple(excerpt.tokens[stop:stop + context])))
    return runs


def common_context(contexts: list[tuple[str, ...]], side: Literal["before", "after"]) -> str:
    """The longest text next to every occurrence (of at least two) on that side, or ''."""
    if len(contexts) < 2:
        return ""
    for size in range(min(len(c) for c in contexts), 0, -1):
        near = {c[-size:] if side == "before" else c[:size] for c in contexts}
        if len(near) == 1:
            return "".join(near.pop()).strip()
    return ""


def pushed_targets(excerpts: list[TargetExcerpt], share: float) -> tuple[list[str], list[str]]:
    """Target strings by mean push where they are candidates, strongest first: the promoted ones and the
    suppressed ones, each pushed at least `share` as much as the most pushed target. (A mean, not a sum:
    each capital city is a candidate once, " The" everywhere; summed noise must not outrank them.)"""
    pushes: dict[str, list[int]] = defaultdict(list)
    for excerpt in excerpts:
        for target, score in zip(excerpt.targets, excerpt.scores):
            pushes[target].append(int(score))
    mean = sorted(((float(np.mean(v)), t) for t, v in pushes.items()), key=lambda item: -item[0])
    cutoff = share * max((abs(m) for m, _ in mean), default=0)
    return ([t for m, t in mean if m > 0 and m >= cutoff], [t for m, t in reversed(mean) if m < 0 and -m >= cutoff])


def label_words(token: str) -> list[str]:
    """Lowercase words of a token string; a token without letters or digits is named by its symbols'
    Unicode names ("colon", "question-mark"), whitespace as "newline" or "space"."""
    words = re.findall(r"[a-z0-9]+", token.lower())
    if words:
        return words
    if token.strip():
        return [unicodedata.name(c, "symbol").lower().replace(" ", "-") for c in token.strip()]
    return ["newline" if "\n" in token else "space"]


def make_explainer(spec: str, cache_path: Path, temperature: float, request_timeout: float,
                   retries: int) -> Explainer:
    if parse_spec(spec, "explainer").kind == "stats":
        return StatsExplainer()
    return LLMExplainer(CachedBackend(make_backend(spec, "explainer"), cache_path, request_timeout, retries),
                        temperature)


def correlation(true: np.ndarray, predicted: np.ndarray) -> float | None:
    """Pearson r over all held-out values; None when either side is constant."""
    if len(true) < 2 or np.ptp(true) == 0 or np.ptp(predicted) == 0:
        return None
    return float(pearsonr(true, predicted).statistic)


def simulated_score(simulator: CachedBackend, kind: Kind, description: str, held_out: HeldOut,
                    attempts: int) -> float | None:
    """Pearson r between the true values of held-out records and the simulator's predictions."""
    prompts = held_out.prompts or [""] * len(held_out)
    predicted = [retry(attempts, lambda attempt, u=units, p=prompt: simulator.predict(
        Simulation(kind, description, tuple(u), p), f"simulate-{kind}", attempt))
        for units, prompt in zip(held_out.units, prompts)]
    return correlation(np.concatenate(held_out.truth).astype(float), np.concatenate(predicted))
