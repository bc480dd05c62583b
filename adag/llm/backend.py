"""The interface every LLM backend implements, its replies and its failures.

Every backend answers two requests: `complete` (a chat completion) and `predict` (a simulator's 0-10
value per token); `predict_many` asks for several predictions at once, which a backend that can batch
(`batches`) answers together. adag.llm.cache.CachedBackend sends all of them through one path.
"""

from __future__ import annotations

import math
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

from adag.llm.roles import Messages, UnusableReply
from adag.llm.simulation import Simulation, parse_scores, simulate_messages

SCORE_TOKENS = [str(i) for i in range(11)]
# Where a sentence ends: '.', '!' or '?' after a lowercase letter, quote or bracket (not "3.5", "1. ", "U.S."
# nor "e.g."), then perhaps a closing quote or parenthesis, then a space; and a list marker a reply may begin with.
SENTENCE_END = re.compile(r"(?<=[a-z'\")\]][.!?])(?<!\.[a-z]\.)[\"')]?\s")
LIST_MARKER = re.compile(r"^(\d+[.)]|[-*\u2022])\s+")
# A lead-in a chat model may put before its reply, on the same line or on a line of its own.
LEAD_IN = re.compile(r"^\s*(answer|description|label|reply|output)\s*:\s*", re.IGNORECASE)


class TransientError(Exception):
    """A failure on the server's side that may pass: timeout, refused connection, 408/409/429, 5xx, 529."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class EndpointDown(Exception):
    """The endpoint cannot serve any request (unreachable after retries, bad key, unknown model)."""


class RequestRejected(Exception):
    """The server refused this one request (e.g. HTTP 400, too long); other requests may still work."""


@dataclass
class Completion:
    text: str
    input_tokens: int = 0
    output_tokens: int = 0
    # Per generated token, the log-probabilities of the top alternatives (when the backend gives them).
    top_logprobs: list[dict[str, float]] | None = None


@dataclass
class Prediction:
    values: list[float]
    input_tokens: int = 0
    output_tokens: int = 0


class Backend(ABC):
    kind: str = ""
    batches: bool = False  # whether predict_many answers its simulations together

    def __init__(self, model: str, base_url: str | None = None):
        self.model = model
        self.base_url = base_url

    @property
    def name(self) -> str:
        """The full endpoint, so that two servers with the same model name never share cached replies."""
        return f"{self.kind}:{self.model}" + (f"@{self.base_url}" if self.base_url else "")

    @property
    def revision(self) -> str:
        """What else decides a reply, where this machine can know it (weights, method); part of the cache key."""
        return ""

    @abstractmethod
    def complete(self, messages: Messages, temperature: float, max_tokens: int, logprobs: bool, seed: int,
                 timeout: float) -> Completion:
        """One chat completion; a failure on the server's side raises TransientError."""

    def predict(self, simulation: Simulation, seed: int, timeout: float) -> Prediction:
        """A chat model answers a JSON list; where log-probabilities come back, the expected value of each
        score token is used instead of the integer."""
        n = len(simulation.units)
        reply = self.complete(simulate_messages(simulation),
                              0.0, 8 * n + 20, True, seed, timeout)
        try:
            values = parse_scores(reply.text, n)
        except UnusableReply as error:
            error.completion = reply
            raise
        expected = [expected_score(alts) for alts in reply.top_logprobs or [] if _is_score_token(alts)]
        if len(expected) == n and all(v is not None for v in expected):
            values = np.array(expected, dtype=float)
        return Prediction(values.tolist(), reply.input_tokens, reply.output_tokens)

    def predict_many(self, simulations: list[Simulation], seed: int, timeout: float) -> list[Prediction]:
        """Several predictions; a backend that `batches` overrides this to answer them together."""
        return [self.predict(simulation, seed, timeout) for simulation in simulations]


def first_sentence(text: str) -> str:
    """A reply up to the end of its first sentence on its first non-empty line, without a lead-in ("Answer:")
    or a list marker before it: every request adag sends asks for one phrase, label, word or list."""
    stripped = LEAD_IN.sub("", text).strip()
    line = LIST_MARKER.sub("", stripped.splitlines()[0].strip()) if stripped else ""
    return SENTENCE_END.split(line, maxsplit=1)[0].strip()


def expected_score(alternatives: dict[str, float]) -> float | None:
    """Expected value of a 0..10 score under a distribution given as log-probabilities."""
    weights = {int(t.strip()): math.exp(v) for t, v in alternatives.items() if t.strip() in SCORE_TOKENS}
    total = sum(weights.values())
    return sum(k * w for k, w in weights.items()) / total if total > 0 else None


def _is_score_token(alternatives: dict[str, float]) -> bool:
    best = max(alternatives, key=alternatives.get)
    return best.strip().isdigit() and 0 <= int(best.strip()) <= 10
