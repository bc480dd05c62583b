"""A chat model run with transformers on this machine, fast enough on a CPU to explain and simulate.

Three things make it so. The turns before a request's last message (instructions, worked examples) are
the same for many requests: their key/value cache is computed once and copied into each request that
starts with them. The simulator's records are scored together, several per forward pass, reading only
the score slots' logits. And a reply ends with its first sentence on its first line: every request adag
sends asks for one phrase, a label, a word or a list, and sizes its new tokens to it.
"""

from __future__ import annotations

import copy
import functools
import math
import threading
from collections import OrderedDict

import torch
from transformers import DynamicCache, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from adag.llm.backend import (
    LEAD_IN,
    SCORE_TOKENS,
    SENTENCE_END,
    Backend,
    Completion,
    Prediction,
    expected_score,
    first_sentence,
)
from adag.llm.roles import Messages
from adag.llm.simulation import Simulation, simulate_messages
from adag.models import LoadedModel, load_model


class LocalBackend(Backend):
    """Sampling uses its own torch.Generator seeded per request (see PrivateSampler), so nothing touches
    the global RNG. `prefix_caching=False` computes every request from scratch (for comparisons)."""

    kind = "local"
    batches = True
    PREFIXES = 8  # key/value caches of shared prefixes kept, least recently used dropped first

    def __init__(self, model: str = "smollm2-135m", lm: LoadedModel | None = None, batch_size: int = 8,
                 prefix_caching: bool = True):
        """`lm`: an already loaded model to use under the name `model`; `batch_size`: simulator records per
        forward pass."""
        super().__init__(model)
        self.lm = lm or shared_model(model)
        self.batch_size = batch_size
        self.prefix_caching = prefix_caching
        self._prefixes: OrderedDict[tuple[int, ...], DynamicCache] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def revision(self) -> str:
        return self.lm.weights_hash

    def _encode(self, messages: Messages) -> list[int]:
        """The conversation through the model's chat template, or as a plain transcript for a base model."""
        from adag.datasets import encode_text, format_messages, uses_chat_template

        tokenizer = self.lm.tokenizer
        return encode_text(tokenizer, format_messages(tokenizer, messages), uses_chat_template(tokenizer))

    def _shared_length(self, messages: Messages, ids: list[int]) -> int:
        """How many leading tokens of `ids` other requests share: those before the last message's text
        (found as the tokens `ids` has in common with the same conversation, its last message emptied)."""
        if not self.prefix_caching or len(messages) < 2:
            return 0
        emptied = self._encode([*messages[:-1], {**messages[-1], "content": ""}])
        shared = next((i for i, (a, b) in enumerate(zip(ids, emptied)) if a != b), min(len(ids), len(emptied)))
        return min(shared, len(ids) - 1)  # at least one token is left to compute

    def _prefix(self, prefix: list[int]) -> DynamicCache | None:
        """The key/value cache of `prefix`, computed on first use (callers copy it before extending it)."""
        if not prefix:
            return None
        key = tuple(prefix)
        if key not in self._prefixes:
            cache = DynamicCache(config=self.lm.model.config)
            self.lm.model(torch.tensor([prefix], device=self.lm.device), cache=cache, use_cache=True)
            self._prefixes[key] = cache
            if len(self._prefixes) > self.PREFIXES:
                self._prefixes.popitem(last=False)
        self._prefixes.move_to_end(key)
        return self._prefixes[key]

    def complete(self, messages: Messages, temperature: float, max_tokens: int, logprobs: bool, seed: int,
                 timeout: float) -> Completion:
        ids = self._encode(messages)
        sampler = LogitsProcessorList([PrivateSampler(seed, temperature)]) if temperature > 0 else None
        with self._lock, torch.no_grad():
            prefix = self._prefix(ids[:self._shared_length(messages, ids)])
            out = self.lm.model.generate(
                torch.tensor([ids], device=self.lm.device), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                cache=copy.deepcopy(prefix) if prefix is not None else None, max_new_tokens=max_tokens,
                do_sample=False, logits_processor=sampler, temperature=None, top_p=None, top_k=None,
                stopping_criteria=StoppingCriteriaList([EndOfSentence(self.lm.tokenizer, len(ids))]),
                output_logits=logprobs, return_dict_in_generate=True, pad_token_id=self.lm.pad_id)
        new = out.sequences[0, len(ids):]
        text = first_sentence(self.lm.tokenizer.decode(new, skip_special_tokens=True))
        top = None
        if logprobs:
            top = []
            for logits in out.logits:
                values, token_ids = logits[0].double().log_softmax(-1).topk(20)
                top.append({self.lm.tokenizer.decode([i]): v for i, v in zip(token_ids.tolist(), values.tolist())})
        return Completion(text, len(ids), len(new), top)

    def predict(self, simulation: Simulation, seed: int, timeout: float) -> Prediction:
        return self.predict_many([simulation], seed, timeout)[0]

    def predict_many(self, simulations: list[Simulation], seed: int, timeout: float) -> list[Prediction]:
        """Teacher-forced: each request's reply `[s, s, ..., s]` is prefilled and the distribution over
        "0".."10" read at each score slot; the prediction is its expected value. Requests that share a
        prefix (the same description) go through the model together, `batch_size` at a time."""
        tokenizer = self.lm.tokenizer
        candidates = [tokenizer(s, add_special_tokens=False)["input_ids"][0] for s in SCORE_TOKENS]
        requests = [self._teacher_forced(simulation) for simulation in simulations]
        groups: dict[tuple[int, ...], list[int]] = {}
        for index, (ids, shared, _) in enumerate(requests):
            groups.setdefault(tuple(ids[:shared]), []).append(index)
        predictions: list[Prediction | None] = [None] * len(requests)
        with self._lock, torch.no_grad():
            for members in groups.values():
                for start in range(0, len(members), self.batch_size):
                    batch = members[start:start + self.batch_size]
                    scores = self._score_slots([requests[i] for i in batch], candidates)
                    for i, values in zip(batch, scores):
                        predictions[i] = Prediction(values, len(requests[i][0]), 0)
        return predictions

    def _teacher_forced(self, simulation: Simulation) -> tuple[list[int], int, list[int]]:
        """The request's tokens with its reply prefilled, how many of them are shared, and the score slots
        (positions whose next token is a score)."""
        tokenizer = self.lm.tokenizer
        messages = simulate_messages(simulation)
        prompt = self._encode(messages)
        ids, slots = list(prompt), []
        for i in range(len(simulation.units)):
            ids += tokenizer("[" if i == 0 else ", ", add_special_tokens=False)["input_ids"]
            slots.append(len(ids) - 1)
            ids += tokenizer("0", add_special_tokens=False)["input_ids"]
        return ids, self._shared_length(messages, prompt), slots

    def _score_slots(self, batch: list[tuple[list[int], int, list[int]]], candidates: list[int]) -> list[list[float]]:
        """One forward pass over requests that share their first `shared` tokens: the rest right-padded
        (causal attention never lets a real token see the padding after it), logits only at the slots."""
        ids, shared, _ = batch[0]
        prefix = self._prefix(ids[:shared])
        rests = [request[0][shared:] for request in batch]
        width = max(map(len, rests))
        padded = torch.tensor([rest + [self.lm.pad_id] * (width - len(rest)) for rest in rests], device=self.lm.device)
        cache = None
        if prefix is not None:
            cache = copy.deepcopy(prefix)
            cache.batch_repeat_interleave(len(batch))
        positions = sorted({slot - shared for _, _, slots in batch for slot in slots})
        logits = self.lm.model(padded, cache=cache, use_cache=prefix is not None,
                               logits_to_keep=torch.tensor(positions, device=self.lm.device)).logits
        column = {position: j for j, position in enumerate(positions)}
        scores = []
        for row, (_, _, slots) in enumerate(batch):
            logprobs = logits[row, [column[slot - shared] for slot in slots]].double().log_softmax(-1)[:, candidates]
            scores.append([expected_score(dict(zip(SCORE_TOKENS, values))) or 0.0 for values in logprobs.tolist()])
        return scores


@functools.lru_cache(maxsize=1)
def shared_model(model: str) -> LoadedModel:
    """One copy of a model's weights per process, whichever roles use it (an explainer and a different
    simulator on the same 1.5B model would otherwise hold 7 GB twice)."""
    return load_model(model)


class EndOfSentence(StoppingCriteria):
    """Stops decoding once the reply holds a line break or a sentence's end after some text (not counting a
    lead-in such as "Answer:"): the end of the phrase asked for (`first_sentence` cuts what follows)."""

    def __init__(self, tokenizer: object, start: int):
        self.tokenizer, self.start = tokenizer, start

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        texts = [LEAD_IN.sub("", self.tokenizer.decode(row[self.start:], skip_special_tokens=True)).lstrip()
                 for row in input_ids]
        return torch.tensor(["\n" in text or SENTENCE_END.search(text) is not None for text in texts],
                            device=input_ids.device)


class PrivateSampler:
    """A logits processor that samples the next token with its own torch.Generator and leaves only that
    token possible, so that greedy decoding in `generate` picks it: sampling without the global RNG."""

    def __init__(self, seed: int, temperature: float):
        self.generator = torch.Generator().manual_seed(seed)
        self.temperature = temperature

    def __call__(self, input_ids, scores):
        probabilities = (scores.double() / self.temperature).softmax(-1).cpu()
        token = torch.multinomial(probabilities, 1, generator=self.generator).to(scores.device)
        return torch.full_like(scores, -math.inf).scatter(-1, token, 0.0)
