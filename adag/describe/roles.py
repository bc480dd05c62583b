"""The role of every prompt token and of every candidate next token, from data available offline, never
from what a dataset is about:
    slot:KEY      tokens of the user's text inside a metadata value (the filled slot, named by its key)
    slot          other tokens of the user's text that vary across prompts
    template:S    a token string S present in the shown part of every prompt (the prompt template)
    system:S      a token string S before the user's text (a chat template's system prompt), one role per
                  string, so that a single strong token is compared with single tokens, not with a sum
and for candidate next tokens: answer (the row's first label, or its metadata answer), alternative (a
further label), slot:KEY (the start of a metadata value), token:S (any other candidate, by string).
"""

from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass

import numpy as np
import pandas as pd

from adag.describe.records import shown_start


def name_of(token: str) -> str:
    """A token string as shown in facts and labels: in double quotes, its spaces and escapes visible (as
    JSON writes it)."""
    return json.dumps(token, ensure_ascii=False)


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


def _string(token: str) -> str:
    return token.strip() or token


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
    strings = [{_string(t) for t in tokens[start:]} for tokens, _, start in shown.values()]
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
                roles.append(f"system:{_string(token)}")
            elif key is not None:
                roles.append(f"slot:{key}")
            elif _string(token) in template:
                roles.append(f"template:{_string(token)}")
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
    """Lowercase words of a text; a token without letters or digits is named by its symbols' Unicode
    names ("colon", "question-mark"), whitespace as "newline" or "space"."""
    words = re.findall(r"[a-z0-9]+", token.lower())
    if words:
        return words
    if token.strip():
        return [unicodedata.name(c, "symbol").lower().replace(" ", "-") for c in token.strip()]
    return ["newline" if "\n" in token else "space"]


def role_words(role: str, category: str = "") -> str:
    """A role in a few label words: a slot by its category (else its key), a constant token quoted, a
    system-prompt token as 'system "S"'."""
    kind, _, detail = role.partition(":")
    if kind == "slot":
        return category or (" ".join(label_words(detail)[:2]) if detail else "slot")
    if kind in ("template", "token"):
        return name_of(_string(detail))
    return f"system {name_of(detail)}" if kind == "system" else kind


def role_phrase(role: str, examples: list[str] | None = None, note: str = "", category: str = "") -> str:
    """A role in words with example token strings, then what it is and a note (e.g. its coverage) in
    parentheses: 'the country " France", " Japan" (filled slot; top input in 8/8 prompts)'. A category
    leads the name ('country words " France", ...'), so that a label's words are found in the phrase."""
    kind, _, detail = role.partition(":")
    if kind == "token":
        return name_of(detail)
    name = {"slot": f"the {detail}" if detail else "the slot tokens",
            "system": f"the system-prompt token {name_of(detail)}",
            "template": f"the template token {name_of(detail)}"}.get(kind, f"the {kind}")
    what = {"slot": f"filled slot {name_of(detail)}" if detail else "tokens that vary across prompts",
            "template": "in every prompt", "system": "before the user's text"}.get(kind, "")
    if kind == "slot" and category:
        name = f"{category} words"
    if examples and kind not in ("template", "system"):
        name += " " + ", ".join(name_of(e) for e in examples[:3])
    inside = [part for part in (what, note) if part]
    return f"{name} ({'; '.join(inside)})" if inside else name
