"""Explainers write candidate descriptions of a cluster from highlighted excerpts; the simulator scores them.

Two explainers share one interface: `LLMExplainer` asks a chat model (worked examples, then the
excerpts), `StatsExplainer` writes a deterministic summary of the same excerpts without any model.
Either way every description is scored the same way, by the simulator on held-out records.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeVar

import numpy as np
from scipy.stats import pearsonr

from adag.describe.categories import Namer, slot_category
from adag.describe.effects import Effect, effects, output_line
from adag.describe.facts import ClusterFacts
from adag.describe.inputs import InputRecord, coverage, input_line, role_context
from adag.describe.prompts import (
    DESCRIPTION_WORDS,
    LABEL_WORDS,
    explain_messages,
    label_messages,
    parse_description,
    parse_label,
    reply_tokens,
)
from adag.describe.records import highlight
from adag.llm import CachedBackend, make_backend
from adag.llm.roles import UnusableReply, parse_spec
from adag.llm.simulation import Simulation

Kind = Literal["input", "negative", "output"]
T = TypeVar("T")


@dataclass
class Scored:
    description: str
    score: float | None


@dataclass
class Excerpt:
    """A record as the explainer sees it: its tokens, which of them are highlighted, their values (raw
    contributions; for the negative part, how much each token suppresses the cluster) and, where known,
    each token's role (adag.describe.facts)."""

    tokens: list[str]
    marked: np.ndarray
    values: np.ndarray | None = None
    roles: list[str] | None = None
    prompt: int = -1

    def render(self) -> str:
        return highlight(self.tokens, self.marked)


@dataclass
class TargetExcerpt:
    """A prompt (its shown part, ending in the seed response) with the cluster's direct effect on each
    candidate next token: integers in [-10, 10] for the explainer, and the logits they come from."""

    prompt: str
    targets: list[str]
    scores: np.ndarray
    values: np.ndarray | None = None
    roles: list[str] | None = None
    prompt_id: int = -1

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


NEGATIVE_WORDS = re.compile(r"\b(not|no|suppress\w*|inhibit\w*|lower\w*|reduc\w*|against)\b", re.IGNORECASE)


def signed_label(label: str, inhibitory: bool) -> str:
    """An LLM label with its cluster's sign in plain words: 'against LABEL' for an inhibitory cluster
    (one that lowers the traced metric), unless the label already says it (no double negation)."""
    return f"against {label}" if inhibitory and not NEGATIVE_WORDS.search(label) else label


class Explainer(ABC):
    # A deterministic explainer writes one description from all excerpts instead of samples on subsets.
    deterministic: bool = False
    # Whether the label carries the cluster's sign itself (else inhibitory clusters get 'against').
    signs_labels: bool = False

    def bounded(self, seconds: float) -> Explainer:
        """The same explainer, giving up after `seconds` (for explainers that wait on a server)."""
        return self

    @abstractmethod
    def describe(self, kind: Kind, excerpts: list, sample: int, attempt: int, facts: ClusterFacts | None = None) -> str:
        """One description of what makes the cluster fire (input), what suppresses it (negative) or what it
        makes the model say (output); `facts` are the cluster's cross-prompt facts, where known."""

    @abstractmethod
    def label(self, descriptions: dict[str, str], excerpts: dict[str, list], attempt: int,
              facts: ClusterFacts | None = None) -> str:
        """A short lowercase label."""


class LLMExplainer(Explainer):
    def __init__(self, llm: CachedBackend, temperature: float):
        self.llm, self.temperature = llm, temperature

    def bounded(self, seconds: float) -> LLMExplainer:
        return LLMExplainer(self.llm.bounded(seconds), self.temperature)

    def describe(self, kind: Kind, excerpts: list, sample: int, attempt: int, facts: ClusterFacts | None = None) -> str:
        """The first attempt wants a reply as short as asked; a retry keeps the first phrase of a longer one."""
        messages = explain_messages(kind, [e.render() for e in excerpts], facts.lines() if facts else [])
        strict = attempt == 0
        reply = self.llm.complete(messages, f"explain-{kind}", temperature=self.temperature,
                                  max_tokens=reply_tokens(DESCRIPTION_WORDS[kind]), sample=sample, attempt=attempt,
                                  accept=lambda c: parse_description(c.text, kind, strict))
        return parse_description(reply.text, kind, strict)

    def label(self, descriptions: dict[str, str], excerpts: dict[str, list], attempt: int,
              facts: ClusterFacts | None = None) -> str:
        """The first attempt wants plain words, as many as asked; a retry keeps the first phrase of the input
        part of a longer or template-shaped label."""
        strict = attempt == 0
        reply = self.llm.complete(label_messages(descriptions["input"], descriptions["output"]), "label",
                                  max_tokens=reply_tokens(LABEL_WORDS), attempt=attempt,
                                  accept=lambda c: parse_label(c.text, strict))
        return parse_label(reply.text, strict)


class StatsExplainer(Explainer):
    """No model. In a run, the descriptions and the label are read from the cluster's facts over all
    prompts (adag.describe.facts), so that they state the same thing; without facts (excerpts alone),
    the same lines are built from the roles of the highlighted tokens weighted by their values and from
    the output effects in logits across the shown prompts."""

    deterministic = True
    signs_labels = True

    def __init__(self, namer: Namer | None = slot_category):
        self.namer = namer

    def describe(self, kind: Kind, excerpts: list, sample: int, attempt: int, facts: ClusterFacts | None = None) -> str:
        if facts is not None:
            return {"input": facts.input_line, "negative": facts.suppressor_line, "output": facts.output_line}[kind]()
        if kind == "output":
            return output_line(*output_effects(excerpts)) if excerpts else ""
        records = input_part(excerpts)
        found = coverage(records, self.namer)
        return input_line(found, len(excerpts), role_context(records, found[0].role), "top") if found else ""

    def label(self, descriptions: dict[str, str], excerpts: dict[str, list], attempt: int,
              facts: ClusterFacts | None = None) -> str:
        if facts is None:
            raise ValueError("the stats explainer labels a cluster from its facts")
        return facts.label


def excerpt_roles(excerpts: list[Excerpt]) -> list[list[str]]:
    """Each excerpt's token roles: as given, or else template (a string in every excerpt) and slot."""
    if all(e.roles is not None for e in excerpts):
        return [list(e.roles) for e in excerpts]
    strings = [{t.strip() or t for t in e.tokens} for e in excerpts]
    common = set.intersection(*strings) if len(strings) > 1 else set()
    return [[f"template:{t.strip() or t}" if (t.strip() or t) in common else "slot" for t in e.tokens]
            for e in excerpts]


def input_part(excerpts: list[Excerpt]) -> list[InputRecord]:
    """The highlighted tokens with their roles, weighted by their values (1 each where none are given)."""
    return [(e.tokens, roles, np.where(e.marked, e.values if e.values is not None else 1.0, 0.0))
            for e, roles in zip(excerpts, excerpt_roles(excerpts))]


def output_effects(excerpts: list[TargetExcerpt]) -> tuple[Effect | None, list[Effect]]:
    """Output findings over the shown prompts, in logits where given (else the integer scores)."""
    return effects([(e.targets, e.roles or [f"token:{t}" for t in e.targets],
                     np.asarray(e.values if e.values is not None else e.scores, dtype=float)) for e in excerpts],
                   len(excerpts))


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
    simulations = [Simulation(kind, description, tuple(units), prompt)
                   for units, prompt in zip(held_out.units, prompts)]
    predicted = simulator.predict_many(simulations, f"simulate-{kind}", attempts)
    return correlation(np.concatenate(held_out.truth).astype(float), np.concatenate(predicted))
