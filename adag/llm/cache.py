"""Every LLM request goes through one path: an on-disk SQLite cache (only accepted replies are stored),
a ledger of calls, retries with backoff for failures on the server's side, and a deadline."""

from __future__ import annotations

import copy
import hashlib
import json
import math
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from adag.llm.backend import Backend, Completion, EndpointDown, TransientError
from adag.llm.roles import Messages, UnusableReply
from adag.llm.simulation import Simulation
from adag.models.cache import cache_dir


def llm_cache_path() -> Path:
    """The one SQLite file that caches every backend's replies (keyed by endpoint and request)."""
    return cache_dir() / "llm-cache.sqlite"


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

    def __init__(self, backend: Backend, cache_path: Path | None = None, request_timeout: float = 120.0,
                 retries: int = 3):
        """`cache_path`: the SQLite file, by default the one llm_cache_path() names."""
        cache_path = cache_path or llm_cache_path()
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

    def predict_many(self, simulations: list[Simulation], purpose: str, attempts: int = 1) -> list[np.ndarray]:
        """`predict` for each simulation; for a backend that batches, those not cached are sent together.
        Elsewhere each is asked up to `attempts` times while its reply is unusable."""
        if not self.backend.batches:
            return [self._predict_retried(simulation, purpose, attempts) for simulation in simulations]
        keys = [self._key(["predict", asdict(simulation), 0]) for simulation in simulations]
        found = {key: value for key in set(keys) if (value := self._cached(key)) is not None}
        for key in keys:
            if key in found:
                self._record(purpose, cached=True, accepted=True, tokens=(0, 0), seconds=0.0)
        missing = list(dict.fromkeys(key for key in keys if key not in found))
        if missing:
            asked = [simulations[keys.index(key)] for key in missing]
            started = time.perf_counter()
            seed = int(missing[0][:15], 16)
            predictions = self._send(lambda timeout: self.backend.predict_many(asked, seed, timeout))
            seconds = (time.perf_counter() - started) / len(missing)
            for key, prediction in zip(missing, predictions):
                self._store(key, prediction.values)
                self._record(purpose, cached=False, accepted=True, seconds=seconds,
                             tokens=(prediction.input_tokens, prediction.output_tokens))
                found[key] = prediction.values
        return [np.array(found[key], dtype=float) for key in keys]

    def _predict_retried(self, simulation: Simulation, purpose: str, attempts: int) -> np.ndarray:
        for attempt in range(attempts - 1):
            try:
                return self.predict(simulation, purpose, attempt)
            except UnusableReply:
                pass
        return self.predict(simulation, purpose, attempts - 1)

    def _key(self, request: list) -> str:
        return hashlib.sha256(json.dumps([self.backend.name, self.backend.revision, *request],
                                         sort_keys=True).encode()).hexdigest()

    def _cached(self, key: str) -> Any:
        with self.state.lock, self._connect() as db:
            row = db.execute("SELECT reply FROM completions WHERE key = ?", (key,)).fetchone()
        return None if row is None else json.loads(row[0])

    def _store(self, key: str, value: Any) -> None:
        with self.state.lock, self._connect() as db:
            db.execute("INSERT OR REPLACE INTO completions VALUES (?, ?)", (key, json.dumps(value)))

    def _through_cache(self, request: list, purpose: str, send: Callable[[int, float], tuple[Any, int, int]]) -> Any:
        key = self._key(request)
        cached = self._cached(key)
        if cached is not None:
            self._record(purpose, cached=True, accepted=True, tokens=(0, 0), seconds=0.0)
            return cached
        started = time.perf_counter()
        try:
            value, *tokens = self._send(lambda timeout: send(int(key[:15], 16), timeout))
        except UnusableReply as error:
            completion = getattr(error, "completion", None) or Completion("")
            self._record(purpose, cached=False, accepted=False, seconds=time.perf_counter() - started,
                         tokens=(completion.input_tokens, completion.output_tokens))
            raise
        self._store(key, value)
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
