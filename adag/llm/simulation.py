"""The simulator's task, what a chat model is asked for it, and how its reply is read.

A chat simulator sees one excerpt's tokens one per line with their indices, so that its list of scores
lines up with them.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Literal

import numpy as np

from adag.llm.roles import Messages, UnusableReply


@dataclass(frozen=True)
class Simulation:
    """A simulator's task: predict 0-10 per unit (a record's tokens, or a prompt's candidate next tokens)."""

    kind: Literal["input", "negative", "output"]  # negative: how much each token suppresses the group
    description: str
    units: tuple[str, ...]
    prompt: str = ""  # outputs: the prompt the candidate tokens would follow


SIMULATE_INPUT = (
    "A group of neurons inside a language model is described as: \"{description}\". Below are the tokens of "
    "one text, one per line as index and token. For each token, predict how strongly the group fires on it, "
    "from 0 (not at all) to 10 (maximally). Reply with a JSON list of integers, the i-th for token i.")
SIMULATE_NEGATIVE = (
    "A group of neurons inside a language model is suppressed by tokens described as: \"{description}\". Below are "
    "the tokens of one text, one per line as index and token. For each token, predict how strongly it suppresses "
    "the group, from 0 (not at all) to 10 (maximally). Reply with a JSON list of integers, the i-th for token i.")
SIMULATE_OUTPUT = (
    "A group of neurons inside a language model is described as: \"{description}\". Below are a prompt, then "
    "candidate next tokens for it, one per line as index and token. For each, predict how strongly the group pushes "
    "the model to say it, from 0 (strongly suppresses) through 5 (no effect) to 10 (strongly promotes). "
    "Reply with a JSON list of integers, the i-th for token i.")


def simulate_messages(simulation: Simulation) -> Messages:
    """The task and the description as the system turn, the record as the user's: every record scored
    against one description shares the first turn (a local model computes it once)."""
    template = {"input": SIMULATE_INPUT, "negative": SIMULATE_NEGATIVE, "output": SIMULATE_OUTPUT}[simulation.kind]
    record = f"Prompt: {json.dumps(simulation.prompt, ensure_ascii=False)}\n\n" if simulation.prompt else ""
    record += "\n".join(f"{i}\t{json.dumps(unit, ensure_ascii=False)}" for i, unit in enumerate(simulation.units))
    record += f"\n\nReply with a JSON list of {len(simulation.units)} integers."
    return [{"role": "system", "content": template.format(description=simulation.description)},
            {"role": "user", "content": record}]


def parse_scores(text: str, n: int) -> np.ndarray:
    """A JSON list of n numbers, clipped to 0..10."""
    match = re.search(r"\[[^\[\]]*\]", text)
    if not match:
        raise UnusableReply(f"simulator reply has no JSON list ({text.strip()[:60]!r})")
    try:
        values = [float(v) for v in json.loads(match.group(0))]
    except (ValueError, TypeError):
        raise UnusableReply(f"simulator list is not numbers ({match.group(0)[:60]!r})") from None
    if len(values) != n:
        raise UnusableReply(f"simulator gave {len(values)} values for {n} items")
    if not np.isfinite(values).all():  # NaN or Infinity: no score, a failure like any unusable reply
        raise UnusableReply(f"simulator list holds non-finite values ({match.group(0)[:60]!r})")
    return np.clip(np.array(values), 0, 10)
