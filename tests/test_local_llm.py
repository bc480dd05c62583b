"""The local LLM backend: its shared-prefix key/value cache and its batched simulator give what a full
computation of each request gives, and its replies end with their first line."""

import pytest
import torch

from adag.describe.prompts import explain_messages, label_messages
from adag.llm.local import EndOfLine, LocalBackend, first_line
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


def test_a_reply_ends_with_its_first_line(tokenizer):
    ids = tokenizer("Answer: capital cities\nand more", add_special_tokens=False)["input_ids"]
    start = len(tokenizer("Answer:", add_special_tokens=False)["input_ids"])
    stop = EndOfLine(tokenizer, start)
    assert stop(torch.tensor([ids]), None).tolist() == [True]
    assert stop(torch.tensor([ids[:start + 2]]), None).tolist() == [False]
    leading = tokenizer("Answer:\n capital", add_special_tokens=False)["input_ids"]
    assert stop(torch.tensor([leading]), None).tolist() == [False]  # a line break before any text
    assert first_line("\n  capital cities \nand more") == "capital cities"
