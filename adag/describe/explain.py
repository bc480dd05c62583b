"""Explainer and simulator: write candidate descriptions, score each on held-out records, keep the best."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import numpy as np
from scipy.stats import pearsonr

from adag.describe.llm import CachedBackend, EmbeddingSimulator, LocalBackend, expected_score
from adag.describe.records import Record, highlight

EXPLAIN_INPUT = (
    "We study a group of neurons inside a language model. Below are text excerpts; the tokens that most "
    "strongly drive the group are marked {{like this}}. Describe in one short phrase what the marked tokens "
    "have in common. Reply with the description only.")
EXPLAIN_OUTPUT = (
    "We study a group of neurons inside a language model. For each prompt below, you see the model's candidate "
    "next tokens and how much the group pushes each one, from -10 (strongly suppresses) to 10 (strongly "
    "promotes). Describe in one short phrase what this group makes the model say. Reply with the description only.")
SIMULATE = (
    "A group of neurons is described as: \"{description}\". For each {unit} below, predict how strongly it "
    "{relation}, from 0 ({low}) to 10 ({high}). Reply with a JSON list of {n} integers, one per {unit}, in order.")
LABEL = (
    "A group of neurons responds to: \"{inputs}\". It makes the model: \"{outputs}\". Give a label of one to "
    "three lowercase words for this group. Reply with the label only.")
MAX_DESCRIPTION = 160
REFUSALS = re.compile(r"\b(i can(not|'t)|i'm sorry|i am sorry|as an ai|unable to)\b", re.IGNORECASE)


class UnusableReply(Exception):
    """An LLM reply that is empty, a refusal, malformed, or of the wrong length."""


@dataclass
class Scored:
    description: str
    score: float | None


def ask_description(explainer: CachedBackend, instruction: str, excerpts: list[str], purpose: str, sample: int,
                    temperature: float) -> str:
    text = "\n".join(f"{i + 1}. {e}" for i, e in enumerate(excerpts))
    reply = explainer.complete([{"role": "user", "content": f"{instruction}\n\n{text}"}], purpose,
                               temperature=temperature, max_tokens=60, sample=sample).text
    description = reply.strip().splitlines()[0].strip().strip('"').strip() if reply.strip() else ""
    description = re.split(r"(?<=[.!?])\s", description, maxsplit=1)[0][:MAX_DESCRIPTION]
    if not description or REFUSALS.search(description):
        raise UnusableReply(f"explainer gave no usable description ({reply.strip()[:60]!r})")
    return description


def simulate(simulator: CachedBackend, description: str, units: list[str], kind: str, sample: int = 0) -> np.ndarray:
    """Predicted 0-10 values, one per unit (token or target). A local model gives expected values from
    one teacher-forced pass; chat backends answer a JSON list (expected values where logprobs come back)."""
    if kind == "input":
        words = dict(unit="token", relation="activates the group", low="not at all", high="maximally")
    else:
        words = dict(unit="candidate next token", relation="the group pushes the model to say it",
                     low="strongly suppressed; 5 means no effect", high="strongly promoted")
    instruction = SIMULATE.format(description=description, n=len(units), **words)
    listing = "\n".join(f"{i + 1}. {json.dumps(u)}" for i, u in enumerate(units))
    messages = [{"role": "user", "content": f"{instruction}\n\n{listing}"}]
    if isinstance(simulator.backend, EmbeddingSimulator):
        return np.array(simulator.backend.predict(description, units))
    if isinstance(simulator.backend, LocalBackend):
        return _simulate_teacher_forced(simulator.backend, messages, units)
    reply = simulator.complete(messages, f"simulate-{kind}", temperature=0.0, max_tokens=8 * len(units) + 20,
                               logprobs=True, sample=sample)
    values = _parse_scores(reply.text, len(units))
    expected = [expected_score(alts) for alts in reply.top_logprobs or [] if _is_score_token(alts)]
    if len(expected) == len(units) and all(v is not None for v in expected):
        return np.array(expected, dtype=float)
    return values


def _is_score_token(alternatives: dict[str, float]) -> bool:
    best = max(alternatives, key=alternatives.get)
    return best.strip().isdigit() and 0 <= int(best.strip()) <= 10


def _parse_scores(text: str, n: int) -> np.ndarray:
    match = re.search(r"\[[^\[\]]*\]", text)
    if not match:
        raise UnusableReply(f"simulator reply has no JSON list ({text.strip()[:60]!r})")
    try:
        values = [float(v) for v in json.loads(match.group(0))]
    except (ValueError, TypeError):
        raise UnusableReply(f"simulator list is not numbers ({match.group(0)[:60]!r})") from None
    if len(values) != n:
        raise UnusableReply(f"simulator gave {len(values)} values for {n} items")
    return np.clip(np.array(values), 0, 10)


def _simulate_teacher_forced(backend: LocalBackend, messages: list[dict[str, str]], units: list[str]) -> np.ndarray:
    text, slots = "[", []
    for i in range(len(units)):
        slots.append(len(text))
        text += "0" + (", " if i < len(units) - 1 else "]")
    distributions = backend.score_distributions(messages, text, slots)
    return np.array([expected_score(d) or 0.0 for d in distributions])


def correlation(true: np.ndarray, predicted: np.ndarray) -> float | None:
    """Pearson r over all held-out values; None when either side is constant."""
    if len(true) < 2 or np.ptp(true) == 0 or np.ptp(predicted) == 0:
        return None
    return float(pearsonr(true, predicted).statistic)


def score_input_description(simulator: CachedBackend, description: str, held_out: list[Record]) -> float | None:
    predicted = [simulate(simulator, description, r.tokens, "input") for r in held_out]
    return correlation(np.concatenate([r.values for r in held_out]), np.concatenate(predicted))


def score_output_description(simulator: CachedBackend, description: str, held_out: list[Record],
                             scores: list[np.ndarray]) -> float | None:
    predicted = [simulate(simulator, description, r.tokens, "output") for r in held_out]
    return correlation(np.concatenate(scores).astype(float), np.concatenate(predicted))


def input_excerpts(records: list[Record], threshold: float) -> list[str]:
    return [highlight(r.tokens, (r.values >= threshold) & (r.values > 0)) for r in records]


def output_excerpts(records: list[Record], scores: list[np.ndarray], prompt_text: dict[int, str]) -> list[str]:
    return [f"Prompt: {prompt_text[r.prompt]!r} -> " + ", ".join(f"{t!r}: {int(s)}" for t, s in zip(r.tokens, sc))
            for r, sc in zip(records, scores)]


def make_label(explainer: CachedBackend, inputs: str, outputs: str, inhibitory: bool) -> str:
    reply = explainer.complete([{"role": "user", "content": LABEL.format(inputs=inputs, outputs=outputs)}],
                               "label", temperature=0.0, max_tokens=12).text
    words = re.sub(r"[^a-z0-9 \-]", " ", reply.strip().splitlines()[0].lower() if reply.strip() else "").split()
    if not words or REFUSALS.search(reply):
        raise UnusableReply(f"explainer gave no usable label ({reply.strip()[:40]!r})")
    label = " ".join(words[:3])
    return f"not[{label}]" if inhibitory else label
