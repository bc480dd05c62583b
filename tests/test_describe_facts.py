"""The stats explainer's facts, descriptions and labels on synthetic runs with known roles
(tests/synthetic.py): one test per rule of adag.describe.facts / inputs / effects / labels."""

import re

import numpy as np
import pytest

from adag.describe.categories import slot_category
from adag.describe.explain import StatsExplainer, signed_label
from adag.describe.facts import cluster_facts
from adag.describe.labels import grounded, tell_apart
from tests.synthetic import CHAT, TURN, RoleRun, translation_run


def _facts(run: RoleRun, namer=None):
    nodes, prompts, cluster = run.tables()
    return cluster_facts(nodes, prompts, cluster, keep_first=False, namer=namer)


def _grounded(facts) -> None:
    """Every label's input words are words of the one-line input description beside it."""
    for item in facts.values():
        assert grounded(item.label, item.input_line()), (item.label, item.input_line())


def test_translation_run_gets_role_labels_and_cross_prompt_facts():
    facts = _facts(translation_run())
    labels = {c: f.label for c, f in facts.items()}
    assert labels == {0: "word -> answer", 1: "not[word -> answer]", 2: '"Answer" -> all candidates',
                      3: 'not[word -> "The"]'}, labels
    lines = {c: "\n".join(f.lines()) for c, f in facts.items()}
    assert 'the word " sun", " book", " bread" (filled slot "word"; top input in 8/8 prompts' in lines[0]
    assert "top input in 8/8 prompts" in lines[2] and 'template token "Answer"' in lines[2]
    assert "100% of its nodes at the last position" in lines[0] and "0% of its nodes at the last" in lines[3]
    assert "layers 5-6" in lines[0] and "3 half-neurons" in lines[0]
    assert 'raises the answer " soleil", " livre", " pain" over the other candidates (in 8/8 prompts, mean +' \
        in lines[0]
    assert 'over the word (filled slot "word") (in 8/8 prompts' in lines[0] and "logits)" in lines[0]
    assert "raises all candidates together (in 8/8 prompts" in lines[2]
    assert not [line for line in facts[2].lines() if line.startswith("output:") and " over " in line]
    assert 'lowers " The" over the other candidates (in 8/8 prompts' in lines[3]
    assert "nearest: cluster 1" in lines[0] and "the opposite relative output effect" in lines[0]
    assert "per prompt on the traced metric (positive in 0/8 prompts" in lines[1]
    _grounded(facts)


def _run(effects_of, inputs_of=None, prompts=8, clusters=1) -> RoleRun:
    """`prompts` prompts "Say WORD now." with candidates [answer, word, " The", " It"]; cluster c's node
    in prompt p reads `inputs_of(c, p, positions)` and has `effects_of(c, p)` on the candidates."""
    run = RoleRun()
    words = ["cat", "dog", "cow", "pig", "hen", "fox", "owl", "bee", "ant", "elk"][:prompts]
    for p, word in enumerate(words):
        tokens = CHAT + ["Say", f" {word}", " now", "."] + TURN
        run.prompt(tokens, f"Say {word} now.", [f" {word.upper()}", f" {word}", " The", " It"], [9.0, 8.0, 7.0, 6.0],
                   {"word": word, "answer": word.upper()})
        where = {"slot": len(CHAT) + 1, "now": len(CHAT) + 2, "say": len(CHAT), "cue": len(tokens) - 2,
                 "helpful": CHAT.index(" helpful"), "system": list(range(1, len(CHAT) - 1))}
        for c in range(clusters):
            inputs = inputs_of(c, p, where) if inputs_of else {where["slot"]: 2.0}
            run.node(c, p, 3 + c, 2.0, inputs, effects_of(c, p))
    return run


def test_the_common_mode_is_reported_and_the_label_names_the_relative_effect():
    """Every candidate +10 logits with the answer 3 more: the label says the answer (what changes the pick);
    the description states the common mode as what it is. With the answer only 0.5 more it says weak."""
    strong = _facts(_run(lambda c, p: [13.0 + 0.1 * p, 10, 10, 10]))[0]
    assert strong.label == "word -> answer", strong.label
    assert strong.output_line().startswith("raises the answer")
    assert "raises all candidates together (in 8/8 prompts, mean +" in strong.output_line()
    weak = _facts(_run(lambda c, p: [10.5, 10, 10, 10]))[0]
    assert weak.label == "word -> answer (weak)" and weak.output_line().startswith("weak: raises the answer")
    lowered = _facts(_run(lambda c, p: [10, 10, 7.0, 10]))[0]
    assert lowered.label == 'not[word -> "The"]', lowered.label


def test_the_system_prompt_counts_per_token_not_as_one_role():
    """Twelve system-prompt tokens of 0.3 each sum to more than the slot token's 1.0, but no single one of
    them beats it; a cluster driven by one system token is named by that token."""
    def inputs(c, p, where):
        return {**{i: 0.3 for i in where["system"]}, where["slot"]: 1.0} if c == 0 else {where["helpful"]: 2.0}

    facts = _facts(_run(lambda c, p: [1.0 + c, 0, 0, 0], inputs, clusters=2))
    assert facts[0].inputs[0].role == "slot:word" and facts[0].label == "word -> answer", facts[0].inputs[:2]
    assert "top input in 8/8 prompts" in facts[0].input_line()
    assert facts[1].label == 'system "helpful" -> answer', facts[1].label
    assert facts[1].input_line().startswith('the system-prompt token "helpful" (before the user\'s text; top input')
    _grounded(facts)


def test_a_slot_is_named_by_the_category_its_strings_share():
    """Free-form prompts (no metadata): the varying tokens are animals; the category comes from the shipped
    embedding model and leads both the description and the label. Strings of no one kind get none."""
    facts = _facts(_run(lambda c, p: [2.0 + 0.1 * p, 0, 0, 0]), namer=slot_category)
    assert facts[0].label.startswith("animal -> "), facts[0].label
    assert facts[0].input_line().startswith('animal words " '), facts[0].input_line()
    _grounded(facts)
    assert slot_category([" banana", " grass", " snow", " sky", " blood"]) == ""
    assert slot_category([" France"]) == ""  # one string is no category


def test_labels_are_told_apart_by_content_before_layer_tags():
    """Four clusters read the slot and raise the answer: two also lower another candidate (" The" or
    " It"), so their labels say which; only the two whose facts are the same get layer tags."""
    second = {0: [3.0, 0, -1.0, 0], 1: [3.0, 0, 0, -1.0], 2: [3.0, 0, 0, 0], 3: [3.0, 0, 0, 0]}
    facts = _facts(_run(lambda c, p: second[c], clusters=4))
    labels = [facts[c].label for c in range(4)]
    assert labels[:2] == ['word -> answer & not "The"', 'word -> answer & not "It"'], labels
    assert labels[2].endswith(" @L5-5") and labels[3] == labels[2].replace("@L5-5", "@L6-6"), labels
    _grounded(facts)
    tell_apart(facts)  # idempotent
    assert [facts[c].label for c in range(4)] == labels


def test_counts_are_over_all_prompts_of_the_run_and_of_prompts_not_pairings():
    """A cluster in 4 of 8 prompts says 4/8; two candidates of one role in a prompt count once."""
    run = _run(lambda c, p: [2.0, 0, 0, 0])
    for row in run.prompts:  # two candidates start the answer in every prompt
        row["target_tokens"][1] = row["target_tokens"][0][:3]
    nodes, prompts, cluster = run.tables()
    keep = nodes["prompt"].to_numpy() < 4
    facts = cluster_facts(nodes[keep].reset_index(drop=True), prompts, cluster[keep], keep_first=False, namer=None)
    text = "\n".join(facts[0].lines() + [facts[0].input_line(), facts[0].output_line()])
    assert "occurs in 4/8 prompts" in text and "top input in 4/8 prompts" in text, text
    assert re.findall(r"in (\d+)/(\d+) prompts", text) and all(
        int(n) <= 4 and int(d) == 8 for n, d in re.findall(r"in (\d+)/(\d+) prompts", text)), text


def test_stats_label_needs_facts_and_signs_are_said_once():
    with pytest.raises(ValueError, match="from its facts"):
        StatsExplainer().label({}, {}, 0)
    assert signed_label("suppresses the", inhibitory=True) == "suppresses the"
    assert signed_label("against capitals", inhibitory=True) == "against capitals"
    assert signed_label("capital city", inhibitory=True) == "against capital city"
    assert signed_label("capital city", inhibitory=False) == "capital city"


def test_a_repeated_constant_string_is_top_by_its_strongest_occurrence_and_a_slot_by_its_tokens_together():
    """Three "\\n" of 0.5 each sum to 1.5 but no single one beats a slot token of 1.0; a slot of two tokens
    of 0.6 (one filled value) beats a single template token of 1.0."""
    from adag.describe.inputs import coverage

    tokens = ["\n", "Say", " New", " York", "\n", ".", "\n"]
    roles = ["template:\n", "template:Say", "slot:city", "slot:city", "template:\n", "template:.", "template:\n"]
    repeated = coverage([(tokens, roles, np.array([0.5, 0, 1.0, 0, 0.5, 0, 0.5]))] * 3)
    assert next(c for c in repeated if c.role == "slot:city").top == 3
    assert next(c for c in repeated if c.role == "template:\n").share > 0.5  # the mass is still summed
    together = coverage([(tokens, roles, np.array([0, 1.0, 0.6, 0.6, 0, 0, 0]))] * 3)
    assert together[0].role == "slot:city" and together[0].top == 3


def test_grounding_needs_every_label_word_and_quoted_string_in_the_description():
    line = 'the template token ":" (in every prompt; top input in 8/8 prompts, 18% of it) after "Answer"'
    assert grounded('":" -> "The" (weak)', line) and grounded('not[":" -> answer] @L3-5', line)
    assert not grounded('"?" -> answer', line) and not grounded('country -> answer', line)
    assert grounded('slot "bees" -> "A"', 'the slot tokens " bees", " the" (tokens that vary across prompts)')
