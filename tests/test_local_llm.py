"""The local LLM backend: its shared-prefix key/value cache and its batched simulator give what a full
computation of each request gives, and its replies end with their first sentence, within the new tokens
the request sized to what it asks for."""

import re

import numpy as np
import pytest
import torch

from adag.describe.explain import Excerpt, LLMExplainer, TargetExcerpt, retry
from adag.describe.prompts import DESCRIPTION_WORDS, LABEL_WORDS, explain_messages, label_messages, reply_tokens
from adag.llm.backend import first_sentence
from adag.llm.cache import CachedBackend
from adag.llm.local import EndOfSentence, LocalBackend
from adag.llm.simulation import Simulation
from tests.tiny import in_float64, tiny_model

# A float64 copy of a tiny model: transformers' RMSNorm still rounds to float32 (see test_models), so two
# summation orders of the same request differ by about sqrt(depth) * 2**-24 relative to the logits;
# an expected score (0..10) moves by at most 10x that. 1e-5 bounds it with a wide margin; a prefix or
# a batch read at the wrong positions is off by far more.
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def tiny_chat(tokenizer):
    return in_float64(tiny_model("qwen2", tokenizer, seed=1))


def _backends(lm, **kw):
    return LocalBackend("tiny", lm=lm, **kw), LocalBackend("tiny", lm=lm, prefix_caching=False, batch_size=1)


def test_prefix_cache_gives_the_replies_of_a_full_computation(tiny_chat):
    """Greedy replies and their log-probabilities, with the shared instructions and worked examples
    computed once and copied into each request, equal those computed from scratch."""
    cached, plain = _backends(tiny_chat)
    requests = [explain_messages("input", [f"Capital of {{{{{country}}}}}?"]) for country in ("France", "Peru")]
    requests.append(label_messages("capital cities", "promotes capitals"))
    for messages in requests:
        fast = cached.complete(messages, 0.0, 6, True, 0, 10)
        slow = plain.complete(messages, 0.0, 6, True, 0, 10)
        assert fast.text == slow.text and fast.input_tokens == slow.input_tokens
        for a, b in zip(fast.top_logprobs, slow.top_logprobs):
            assert a.keys() == b.keys()
            assert max(abs(a[k] - b[k]) for k in a) <= TOLERANCE * max(1.0, *map(abs, a.values()))
    # Both explainer requests shared one prefix; the label request (one message) has none.
    assert len(cached._prefixes) == 1 and not plain._prefixes
    prefix = next(iter(cached._prefixes))
    assert len(prefix) > 100  # the instruction and the worked examples


def test_batched_simulator_equals_one_record_at_a_time(tiny_chat):
    """Records of two descriptions, of different lengths, scored in batches of 3 over a cached prefix
    equal each record scored alone from scratch."""
    batched, single = _backends(tiny_chat, batch_size=3)
    units = [("What", " is"), (" the", " capital", " of", " France", "?"), (" Paris",), ("a", "b", "c", "d")]
    simulations = [Simulation("input", description, u) for description in ("capitals", "question words") for u in units]
    simulations.append(Simulation("output", "promotes capitals", (" Paris", " Lima"), "Capital of France?"))
    together = batched.predict_many(simulations, 0, 10)
    for simulation, prediction in zip(simulations, together):
        alone = single.predict(simulation, 0, 10)
        assert len(prediction.values) == len(simulation.units)
        torch.testing.assert_close(torch.tensor(prediction.values), torch.tensor(alone.values), rtol=0,
                                   atol=TOLERANCE * 10)
    assert len(batched._prefixes) == 3  # one per description


def test_a_reply_ends_with_its_first_sentence(tokenizer):
    start = len(tokenizer("Answer:", add_special_tokens=False)["input_ids"])
    for text, ends in (("Answer: capital cities\nand more", True), ("Answer: capital cities. And more", True),
                       ("Answer: \"capital cities.\" And more", True), ("Answer: U.S. states", False),
                       ("Answer: digits 3.5 and", False), ("Answer:\n capital", False),
                       ("Answer: Label:\n", False), ("Answer: Label:\ncapital cities\n", True)):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert EndOfSentence(tokenizer, start)(torch.tensor([ids]), None).tolist() == [ends], text
    assert first_sentence("\n  capital cities \nand more") == "capital cities"
    assert first_sentence("1. capital cities. They are") == "capital cities."
    assert first_sentence("Answer:\ncapital cities\n") == first_sentence(" label: capital cities") == "capital cities"
    assert first_sentence("U.S. states, e.g. Ohio") == "U.S. states, e.g. Ohio"


def test_a_model_that_runs_on_is_cut_to_the_phrase_asked_for(tiny_chat, tmp_path):
    """A random tiny model never ends its reply: each request gets only the new tokens its words need, a
    description longer than asked is asked again, and what is kept is one phrase within the words asked."""
    llm = CachedBackend(LocalBackend("tiny", lm=tiny_chat), tmp_path / "cache.sqlite")
    explainer = LLMExplainer(llm, temperature=1.0)
    excerpts = [Excerpt(["The", " capital", " of", " France"], np.array([0, 0, 0, 1], bool))]
    for kind in ("input", "output"):
        shown = excerpts if kind == "input" else [TargetExcerpt("Capital of France?", [" Paris"], np.array([9.0]))]
        description = retry(3, lambda attempt, k=kind, s=shown: explainer.describe(k, s, 0, attempt))
        assert 0 < len(description.split()) <= DESCRIPTION_WORDS[kind], description
    label = retry(3, lambda attempt: explainer.label({"input": "x", "output": "y"}, {}, attempt))
    assert 0 < len(label.split()) <= LABEL_WORDS and re.fullmatch(r"[a-z0-9\- ]+", label), label
    asked = [reply_tokens(DESCRIPTION_WORDS["input"]), reply_tokens(DESCRIPTION_WORDS["output"]),
             reply_tokens(LABEL_WORDS)]
    assert all(0 < entry.output_tokens <= max(asked) for entry in llm.ledger)
    assert any(not entry.accepted for entry in llm.ledger)  # a run-on first reply was asked again
