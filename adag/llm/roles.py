"""The three roles an LLM plays in adag, and which backends can play each, checked without loading anything.

explainer: writes a cluster's descriptions (describe); simulator: predicts a 0-10 value per token from a
description (describe's scores); judge: answers yes/no about a generation (the judge measure and stage).
Light on purpose (no numpy): the settings models of describe and steer check their backends at start-up.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic_core import PydanticCustomError

Role = Literal["explainer", "simulator", "judge"]
Messages = list[dict[str, str]]  # a chat: [{"role": "system" | "user" | "assistant", "content": ...}]
# Kinds that can play each role. `stats` is the offline explainer (adag.describe.explain), not an LLM;
# `embed` scores texts against a description but cannot write one.
ROLES: dict[str, tuple[str, ...]] = {"explainer": ("stats", "local", "openai", "anthropic"),
                                     "simulator": ("embed", "local", "openai", "anthropic"),
                                     "judge": ("local", "openai", "anthropic")}
SPELLING = {"stats": "stats", "embed": "embed[:minilm]", "local": "local[:MODEL]", "openai": "openai:MODEL[@URL]",
            "anthropic": "anthropic:MODEL[@URL]"}


class UnusableReply(Exception):
    """An LLM reply that is empty, a refusal, malformed, or of the wrong length."""

    completion = None  # the rejected reply, when there was one (its tokens still go into the ledger)


@dataclass(frozen=True)
class BackendSpec:
    kind: str
    model: str
    base_url: str | None = None


def parse_spec(spec: str, role: Role) -> BackendSpec:
    """Check `KIND[:MODEL][@URL]` for a role; a ValueError says what to write instead."""
    kind, _, rest = spec.partition(":")
    model, _, base_url = rest.partition("@")
    chat = "local:MODEL, openai:MODEL[@URL] or anthropic:MODEL"
    if kind == "embed" and role == "explainer":
        raise ValueError(f"'{spec}' cannot be the explainer: an embedding model scores descriptions but cannot "
                         f"write them; use stats (offline), {chat}")
    if kind in ("embed", "stats") and role == "judge":
        raise ValueError(f"'{spec}' cannot be the judge: it cannot answer a question; use {chat}")
    if kind == "stats" and role == "simulator":
        raise ValueError(f"'stats' writes descriptions but cannot score them; use embed:minilm (offline), {chat} "
                         "as the simulator")
    if kind not in ROLES[role]:
        raise ValueError(f"unknown backend '{spec}'; as {role} use " + ", ".join(SPELLING[k] for k in ROLES[role]))
    if kind in ("openai", "anthropic") and not model:
        raise ValueError(f"'{spec}' names no model; use {kind}:MODEL, e.g. openai:gpt-4o-mini")
    if base_url and kind not in ("openai", "anthropic"):
        raise ValueError(f"'{spec}': only openai: and anthropic: backends take an @URL")
    default = {"local": "smollm2-135m", "embed": "minilm"}.get(kind, "")
    return BackendSpec(kind, model or default, base_url or None)


def checked(spec: str, role: Role) -> str:
    """`spec` if it can play `role`, for a settings field's validator (the error is the setting's)."""
    try:
        parse_spec(spec, role)
    except ValueError as error:
        raise PydanticCustomError("backend", str(error).replace("{", "{{").replace("}", "}}")) from None
    return spec
