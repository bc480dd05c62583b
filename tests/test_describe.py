import json
import re
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from adag.cli import app
from adag.cluster import ClusterConfig, cluster_run
from adag.datasets import load_dataset
from adag.describe import DescribeConfig, describe_run
from adag.describe import run as describe_run_module
from adag.describe.categories import VOCABULARY
from adag.describe.config import DescribeOptions
from adag.describe.explain import (
    Excerpt,
    HeldOut,
    LLMExplainer,
    StatsExplainer,
    TargetExcerpt,
    correlation,
    retry,
    simulated_score,
)
from adag.describe.labels import grounded
from adag.describe.prompts import DESCRIPTION_WORDS, LABEL_WORDS, explain_messages, parse_description, reply_tokens
from adag.describe.records import (
    Record,
    exemplar_pool,
    highlight,
    input_records,
    normalised_scores,
    quantile_walk_threshold,
    raw_inputs,
    shown_start,
    shown_text,
    sign_part,
    top_k_mask,
)
from adag.describe.roles import label_words
from adag.describe.run import best_description, input_split, make_llms, output_split
from adag.errors import AdagError
from adag.llm import (
    AnthropicBackend,
    CachedBackend,
    EndpointDown,
    LocalBackend,
    OpenAIBackend,
    expected_score,
    make_backend,
)
from adag.llm.roles import UnusableReply
from adag.llm.simulation import Simulation, simulate_messages
from adag.report.data import run_payload
from adag.store import MANIFEST, RunDir
from adag.trace import TraceConfig, trace_dataset
from adag.view import RunView, first_counted_position, prompt_input_vectors
from tests.fake_openai import HANG, FakeOpenAI, cooperative, error_body, reading_model, reply_body
from tests.fake_openai import asked as asked_text
from tests.planted_rules import RULES, dataset_prompts, evaluate_rule, planted_records

REPO = Path(__file__).resolve().parents[1]
MESSAGES = [{"role": "user", "content": "hi"}]


def test_highlight_merges_consecutive_tokens():
    tokens = ["The", " city", " of", " New", " York", " is", " big"]
    mask = np.array([0, 0, 0, 1, 1, 0, 1], dtype=bool)
    assert highlight(tokens, mask) == "The city of {{New York}} is {{big}}"
    assert highlight(["a", "b"], np.array([True, True])) == "{{ab}}"


def test_quantile_walk_stops_at_k_distinct_strings():
    records = [Record(0, ["x", " a", " b"], np.array([0.0, 9.0, 1.0])),
               Record(1, ["y", " a", " c"], np.array([0.0, 8.0, 2.0]))]
    # k=1: the most extreme quantile already highlights " a" only.
    threshold = quantile_walk_threshold(records, k=1)
    assert {t.strip() for r in records for t, v in zip(r.tokens, r.values) if v >= threshold} == {"a"}
    # k=2 must walk down until a second distinct string ("c", value 2) is highlighted.
    threshold = quantile_walk_threshold(records, k=2)
    highlighted = {t.strip() for r in records for t, v in zip(r.tokens, r.values) if v >= threshold}
    assert highlighted == {"a", "c"}
    assert quantile_walk_threshold([Record(0, ["x"], np.zeros(1))]) == float("inf")


def test_top_k_mask():
    record = Record(0, list("abcde"), np.array([0.1, 5.0, 0.0, 3.0, 0.0]))
    assert top_k_mask(record, 2).tolist() == [False, True, False, True, False]
    assert top_k_mask(record, 4).tolist() == [True, True, False, True, False]  # zeros never highlighted


def test_sign_split_and_output_normalisation():
    record = Record(0, ["a", "b"], np.array([2.0, -1.0]))
    assert sign_part([record], 1)[0].values.tolist() == [2.0, 0.0]
    assert sign_part([record], -1)[0].values.tolist() == [0.0, 1.0]
    scores = normalised_scores([Record(0, ["a", "b"], np.array([0.5, -0.2])), Record(1, ["c"], np.array([0.04]))])
    assert scores[0].tolist() == [10, -4] and scores[1].tolist() == [1]
    assert all(-10 <= v <= 10 for s in scores for v in s)


def test_held_out_records_are_never_explained():
    records = [Record(i, ["t"], np.array([float(i % 17)])) for i in range(150)]
    explain, held_out = exemplar_pool(records, top=80, random=20, seed=1)
    assert not {r.prompt for r in explain} & {r.prompt for r in held_out}
    assert len(explain) + len(held_out) == 100
    strongest = max(r.values.max() for r in records)
    assert max(r.values.max() for r in explain) == strongest and max(r.values.max() for r in held_out) == strongest


def test_score_is_pearson_and_undefined_when_constant():
    true, predicted = np.array([0, 0, 10, 0, 5.0]), np.array([1, 0, 9, 2, 4.0])
    assert correlation(true, predicted) == pytest.approx(np.corrcoef(true, predicted)[0, 1])
    assert correlation(true, np.ones(5)) is None


def test_expected_score_from_logprobs():
    assert expected_score({"0": np.log(0.5), "10": np.log(0.5), "cat": 0.0}) == pytest.approx(5.0)
    assert expected_score({"cat": 0.0}) is None


def test_simulator_sees_tokens_one_per_line_with_indices():
    system, record = simulate_messages(Simulation("input", "digits", ("What", " is", " 4", "\n")))
    assert record["content"].splitlines()[:4] == ['0\t"What"', '1\t" is"', '2\t" 4"', '3\t"\\n"']
    assert "JSON list of integers, the i-th for token i" in system["content"]
    assert record["content"].endswith("JSON list of 4 integers.")


def test_simulator_records_of_one_description_share_the_first_turn():
    """What a local simulator computes once per description: the system turn holds the task and the
    description, the user turn only the record."""
    first, second = (simulate_messages(Simulation("input", "digits", units)) for units in (("a",), ("b", "c")))
    assert first[0] == second[0] and "digits" in first[0]["content"] and first[1] != second[1]


def test_output_simulator_sees_the_prompt():
    content = simulate_messages(Simulation("output", "capitals", (" Paris", " The"), "Capital of France?"))[-1]
    assert 'Prompt: "Capital of France?"\n\n0\t" Paris"\n1\t" The"' in content["content"]


def test_explainer_sees_worked_examples_before_the_excerpts():
    messages = explain_messages("input", ["the {{cat}} sat"])
    assert messages[0]["role"] == "system" and "in common" in messages[0]["content"]
    assert [m["role"] for m in messages[1:3]] == ["user", "assistant"]  # a worked example
    assert messages[-1] == {"role": "user", "content": "Excerpts:\n1. the {{cat}} sat"}


def test_stats_explainer_names_the_role_weighted_by_values_its_category_and_its_constant_context():
    def excerpt(country, value=5.0):
        tokens = ["What", " is", " the", " capital", " of", country, "?"]
        marked = np.array([t in (country, "?") for t in tokens])
        return Excerpt(tokens, marked, np.where(np.array(tokens) == country, value, 0.5 * marked))

    # "?" is highlighted in every excerpt (a template token) but weakly: the varying slot is named first,
    # by the category its strings share (nearest category word in the shipped embedding model).
    excerpts = [excerpt(" France"), excerpt(" Japan"), excerpt(" Peru", 4.0)]
    text = StatsExplainer().describe("input", excerpts, 0, 0)
    assert text.startswith('country words " France", " Japan", " Peru" (tokens that vary across prompts; '
                           'top in 3/3 prompts, '), text
    assert text.endswith(' after "capital of" before "?"'), text
    assert StatsExplainer(namer=None).describe("input", excerpts, 0, 0).startswith('the slot tokens " France"')


def _target_excerpts(n: int, answer_push: float, the_push: float) -> list[TargetExcerpt]:
    """n prompts, each with its own answer (a candidate once only) and ' The' everywhere, in logits."""
    words = [f" w{i}" for i in range(n)]
    return [TargetExcerpt(f"Say {w}? Reply:", [f" a{i}", w, " The"], np.zeros(3),
                          np.array([answer_push, 0.0, the_push]) * (1 + 0.1 * i),
                          ["answer", "slot:word", "token: The"], i)
            for i, w in enumerate(words)]


def test_output_description_holds_across_prompts_not_per_target_string():
    """Cause 3: the list of promoted targets averaged per string, and each answer occurs in one prompt, so
    it listed the top prompt's candidates. Now effects are grouped by role across prompts, in logits."""
    text = StatsExplainer().describe("output", _target_excerpts(8, 3.0, -1.0), 0, 0)
    assert text.startswith('raises the answer " a7", " a6", " a5" over the other candidates (in 8/8 prompts, mean +')
    assert 'lowers " The" over the other candidates (in 8/8 prompts, mean -' in text and "logits)" in text


def test_negative_part_is_explained_and_simulated_as_what_suppresses():
    """Cause 5: the negative part was sent as 'tokens where the group fires most' and simulated as firing."""
    system = explain_messages("negative", ["the {{cat}} sat"])[0]["content"]
    assert "suppress" in system and "fires most" not in system
    content = "\n".join(m["content"] for m in simulate_messages(Simulation("negative", "digits", ("a", "b"))))
    assert "suppresses the group" in content and "fires on it" not in content


def _openai(server, tmp_path, **kw):
    return CachedBackend(OpenAIBackend("fake", base_url=server.url), tmp_path / "cache.sqlite", **{"retries": 2, **kw})


def test_rate_limit_then_success_and_cache_hit(tmp_path):
    with FakeOpenAI([(429, {"error": {"message": "slow down"}}), (200, reply_body("hello"))]) as server:
        backend = _openai(server, tmp_path)
        assert backend.complete(MESSAGES, "test").text == "hello"
        assert len(server.requests) == 2  # the 429 was retried
        assert backend.complete(MESSAGES, "test").text == "hello"
        assert len(server.requests) == 2  # served from the cache: no request sent
        assert [e.cached for e in backend.ledger] == [False, True]
        assert backend.ledger[0].input_tokens == 10


def test_server_errors_are_retried(tmp_path):
    with FakeOpenAI([(500, {"error": {"message": "boom"}}), (200, reply_body("fine"))]) as server:
        assert _openai(server, tmp_path).complete(MESSAGES, "test").text == "fine"
        assert len(server.requests) == 2


def test_simulator_uses_logprobs_when_present_and_integers_when_absent(tmp_path):
    tokens = [("[", {"[": 0.0}), ("2", {"2": np.log(0.5), "4": np.log(0.5)}), (",", {",": 0.0}),
              ("8", {"8": 0.0}), ("]", {"]": 0.0})]
    with FakeOpenAI([(200, reply_body("[2, 8]", tokens)), (200, reply_body("[2, 8]"))]) as server:
        backend = _openai(server, tmp_path)
        with_logprobs = backend.predict(Simulation("input", "numbers", ("a", "b")), "simulate")
        assert with_logprobs.tolist() == pytest.approx([3.0, 8.0])
        assert server.requests[0]["logprobs"] is True
        without = backend.predict(Simulation("input", "digits", ("a", "b")), "simulate")
        assert without.tolist() == [2.0, 8.0]


def test_malformed_and_wrong_length_replies_are_unusable_and_never_cached(tmp_path):
    script = [(200, reply_body("I think they are all high")), (200, reply_body("[1, 2, 3]")),
              (200, reply_body("[1, 2"))]  # the last one cut off mid-list
    with FakeOpenAI(script) as server:
        backend = _openai(server, tmp_path)
        simulation = Simulation("input", "x", ("a", "b"))
        with pytest.raises(UnusableReply, match="no JSON list"):
            backend.predict(simulation, "simulate")
        with pytest.raises(UnusableReply, match="3 values for 2"):
            backend.predict(simulation, "simulate", attempt=1)
        with pytest.raises(UnusableReply, match="no JSON list"):
            backend.predict(simulation, "simulate", attempt=2)
        assert backend.predict(simulation, "simulate").tolist() == [0, 3]  # asked again, not replayed
        assert len(server.requests) == 4
        assert [e.accepted for e in backend.ledger] == [False, False, False, True]
        assert backend.ledger[0].input_tokens == 10  # a rejected reply's tokens are still counted


EXCERPTS = [Excerpt(["The", " capital", " of", " France"], np.array([0, 0, 0, 1], bool))]


def test_a_refused_reply_is_not_cached_so_a_rerun_asks_again(tmp_path):
    """Cache bug: replies were cached before they were checked, so after three refusals a rerun against
    a healthy server sent no request and failed again."""
    refusal = reply_body("I'm sorry, I cannot help with that.")
    with FakeOpenAI([(200, refusal)] * 3) as server:
        first = LLMExplainer(_openai(server, tmp_path), temperature=1.0)
        with pytest.raises(UnusableReply):
            retry(3, lambda attempt: first.describe("input", EXCERPTS, 0, attempt))
        assert len(server.requests) == 3
        rerun = LLMExplainer(_openai(server, tmp_path), temperature=1.0)
        assert retry(3, lambda attempt: rerun.describe("input", EXCERPTS, 0, attempt)) == "names of countries"
        assert len(server.requests) == 4


def test_label_retries_send_a_new_request(tmp_path):
    """Cache bug: every attempt at a label sent the same key, so a cached refusal was replayed."""
    with FakeOpenAI([(200, reply_body("I'm sorry, I can't."))]) as server:
        explainer = LLMExplainer(_openai(server, tmp_path), temperature=1.0)
        label = retry(3, lambda attempt: explainer.label({"input": "x", "output": "y"}, {}, attempt))
        assert label == "capital city" and len(server.requests) == 2


def test_cache_key_holds_the_full_endpoint(tmp_path):
    """Cache bug: the key held openai:MODEL only, so a second server with the same model name got the
    first server's replies."""
    with FakeOpenAI([(200, reply_body("first"))]) as one, FakeOpenAI([(200, reply_body("second"))]) as two:
        assert _openai(one, tmp_path).complete(MESSAGES, "test").text == "first"
        assert _openai(two, tmp_path).complete(MESSAGES, "test").text == "second"
        assert _openai(two, tmp_path).name == f"openai:fake@{two.url}"


def test_local_samples_differ_are_reproducible_and_leave_the_global_rng_alone(tiny_models, tmp_path):
    """Cache bug: the local backend seeded from (messages, temperature) only, so all samples were equal."""
    backend = CachedBackend(LocalBackend("tiny", lm=tiny_models["llama"]), tmp_path / "cache.sqlite")
    state = torch.random.get_rng_state()
    texts = [backend.complete(MESSAGES, "test", temperature=1.0, max_tokens=8, sample=s).text for s in range(5)]
    assert len(set(texts)) > 1
    assert torch.equal(torch.random.get_rng_state(), state)
    again = CachedBackend(LocalBackend("tiny", lm=tiny_models["llama"]), tmp_path / "other.sqlite")
    assert again.complete(MESSAGES, "test", temperature=1.0, max_tokens=8, sample=3).text == texts[3]


def test_every_simulator_goes_through_cache_and_ledger(tiny_models, tmp_path):
    """Cache bug: local and embedding simulators bypassed the cache and the ledger."""
    simulation = Simulation("input", "digits", ("What", " is", " 4"))
    for backend in (LocalBackend("tiny", lm=tiny_models["llama"]), make_backend("embed:minilm", "simulator")):
        llm = CachedBackend(backend, tmp_path / "cache.sqlite")
        first, second = (llm.predict(simulation, "simulate-input") for _ in range(2))
        assert first.tolist() == second.tolist() and len(first) == 3 and ((first >= 0) & (first <= 10)).all()
        assert [e.cached for e in llm.ledger] == [False, True]


def test_anthropic_backend_success_429_529_and_malformed(tmp_path, monkeypatch):
    monkeypatch.setenv("ANTHROPIC_API_KEY", "test-key")
    script = [(429, error_body("rate_limit_error", "slow down")), (529, error_body("overloaded_error", "Overloaded")),
              (200, None), (200, '{"id": "msg_x", "type": "mess'), (200, {"type": "message", "content": []})]
    with FakeOpenAI(script) as server:
        backend = CachedBackend(AnthropicBackend("fake", base_url=server.url.removesuffix("/v1")),
                                tmp_path / "cache.sqlite", retries=2)
        messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "a label of one to three"}]
        assert backend.complete(messages, "test").text == "capital city"
        assert len(server.requests) == 3  # 429 and 529 were retried
        assert server.requests[-1]["system"] == "Be brief."
        assert [m["role"] for m in server.requests[-1]["messages"]] == ["user"]
        assert backend.ledger[-1].input_tokens == 10 and backend.ledger[-1].output_tokens == 5
        with pytest.raises(UnusableReply, match="malformed"):
            backend.complete(messages, "test", attempt=1)
        with pytest.raises(UnusableReply, match="without content"):
            backend.complete(messages, "test", attempt=2)
        assert backend.complete(messages, "test", attempt=3).text == "capital city"


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_a_refused_connection_is_detected_once(tmp_path):
    backend = CachedBackend(OpenAIBackend("fake", base_url=f"http://127.0.0.1:{_closed_port()}/v1"),
                            tmp_path / "cache.sqlite", retries=1)
    sent = []
    send = backend.backend.complete
    backend.backend.complete = lambda *args: sent.append(1) or send(*args)
    with pytest.raises(EndpointDown, match="failed 2 times in a row"):
        backend.complete(MESSAGES, "test")
    with pytest.raises(EndpointDown):
        backend.complete(MESSAGES, "test", sample=1)
    assert len(sent) == 2  # the second call did not try again


def test_a_server_that_never_answers_times_out_and_counts_as_down(tmp_path):
    with FakeOpenAI([(200, HANG)] * 5) as server:
        backend = _openai(server, tmp_path, request_timeout=0.3, retries=1)
        with pytest.raises(EndpointDown, match="timed out"):
            backend.complete(MESSAGES, "test")
        with pytest.raises(EndpointDown):
            backend.complete(MESSAGES, "test", sample=1)
        assert len(server.requests) == 2


def test_the_time_per_cluster_is_bounded(tmp_path):
    with FakeOpenAI([(200, HANG)] * 5) as server:
        backend = _openai(server, tmp_path, request_timeout=600, retries=5).bounded(0.3)
        with pytest.raises(TimeoutError, match="time allowed per cluster ran out"):
            backend.complete(MESSAGES, "test")
        assert len(server.requests) == 1 and backend.state.down is None  # cut at the deadline, not after 600 s


def test_empty_choices_and_a_body_cut_mid_json_are_retried_and_never_cached(tmp_path):
    empty = reply_body("x") | {"choices": []}
    cut = json.dumps(reply_body("names of countries"))[:60]
    with FakeOpenAI([(200, empty), (200, cut)]) as server:
        explainer = LLMExplainer(_openai(server, tmp_path), temperature=1.0)
        with pytest.raises(UnusableReply, match="without choices"):
            explainer.describe("input", EXCERPTS, 0, 0)
        with pytest.raises(UnusableReply, match="malformed"):
            explainer.describe("input", EXCERPTS, 0, 1)
        assert retry(3, lambda attempt: explainer.describe("input", EXCERPTS, 0, attempt)) == "names of countries"
        assert [e.accepted for e in explainer.llm.ledger] == [False, False, True]


def test_backend_specs_are_checked_for_their_role(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    with pytest.raises(AdagError, match="set OPENAI_API_KEY"):
        make_backend("openai:gpt-4o-mini", "simulator")
    with pytest.raises(AdagError, match="set ANTHROPIC_API_KEY"):
        make_backend("anthropic:claude", "judge")
    with pytest.raises(AdagError, match="unknown backend 'gemini:x'; as simulator"):
        make_backend("gemini:x", "simulator")
    with pytest.raises(AdagError, match="cannot be the explainer"):
        make_backend("embed:minilm", "explainer")
    with pytest.raises(ValueError, match="cannot be the explainer"):
        DescribeConfig(explainer="embed:minilm")
    with pytest.raises(ValueError, match="cannot score them"):
        DescribeConfig(simulator="stats")


def test_the_judge_is_a_role_of_its_own():
    """A judge must answer questions: an embedding simulator or the stats explainer is refused when the
    settings are made, not when the judge is first asked (it used to be checked as a simulator)."""
    from adag.steer.config import JudgeConfig, MeasureConfig

    with pytest.raises(AdagError, match="cannot be the judge"):
        make_backend("embed:minilm", "judge")
    for spec in ("embed:minilm", "stats"):
        with pytest.raises(ValueError, match="cannot be the judge"):
            MeasureConfig(measure="judge", question="Is it a city?", judge=spec)
    with pytest.raises(ValueError, match="unknown backend 'gemini:x'; as judge use local"):
        JudgeConfig(cluster=0, question="Is it a city?", judge="gemini:x")
    assert JudgeConfig(cluster=0, question="Is it a city?", judge="openai:gpt-4o-mini@http://h:1/v1").judge


def test_describe_stage_end_to_end_resumes_from_cache(clustered_run, tmp_path, monkeypatch):
    monkeypatch.setenv("ADAG_CACHE", str(tmp_path))
    with FakeOpenAI() as server:
        spec = f"openai:fake@{server.url}"
        config = DescribeConfig(explainer=spec, simulator=spec, samples=2)
        estimate = describe_run(str(clustered_run), config, dry_run=True).facts
        assert estimate["calls"] > 0 and not server.requests
        result = describe_run(str(clustered_run), config, progress=False, concurrency=2).facts
        assert result == {"clusters": 3, "failed": 0}
        table = RunDir.open(clustered_run).read_table("describe", "descriptions")
        assert set(table["input_description"]) == {"names of countries"}
        assert table["label"].str.fullmatch(r"(against )?capital city").all()
        assert table["input_score"].notna().any()
        sent = len(server.requests)
        assert sent > 0
        describe_run(str(clustered_run), config.model_copy(update={"clusters": None}), progress=False)
        assert len(server.requests) == sent  # a rerun is served from the cache


def test_a_description_with_broken_characters_is_unusable():
    """Seen from a local model sampling at temperature 1: "The\u7b3c\ufffd" (a cut byte sequence)."""
    with pytest.raises(UnusableReply):
        parse_description("The\u7b3c\ufffd", "input")
    assert parse_description("city\ufffd names", "input", strict=False) == "city names"
    assert parse_description("names of cities. And more", "input") == "names of cities"


def test_template_labels_and_run_on_replies_are_asked_again_then_kept_as_one_plain_phrase(clustered_run, tmp_path,
                                                                                         monkeypatch):
    """An LLM that imitates the stats explainer's labels (`not[country -> answer over country]`) and lists
    the marked tokens past the words asked for: each request is sized to the words it asks for, a reply in
    template form or too long is asked once more, and what is kept is its first phrase in plain words."""
    monkeypatch.setenv("ADAG_CACHE", str(tmp_path))
    run = _without_describe(clustered_run, tmp_path / "run")

    def imitator(text: str) -> str:
        if "label of one to" in text:
            return "not[country -> answer over country] @L3-17"
        if "JSON list of" in text:
            return cooperative(text)
        return "the country France, Japan, Peru, Chile and Oslo, then the capital cities of all of them"

    with FakeOpenAI(respond=imitator) as server:
        spec = f"openai:fake@{server.url}"
        describe_run(str(run), DescribeConfig(explainer=spec, simulator=spec, samples=1), progress=False)
        asked = [(body["messages"][-1]["content"], body["max_tokens"]) for body in server.requests
                 if "JSON list of" not in asked_text(body)]
    table = RunDir.open(run).read_table("describe", "descriptions")
    assert set(table["label"]) <= {"country", "against country"}, table["label"].tolist()
    for column in ("input_description", "output_description"):
        assert set(table[column].dropna()) == {"the country France"}, table[column].tolist()
    labels = [tokens for text, tokens in asked if "label of one to" in text]
    # Asked once more after the template reply (a retry that is already cached is not sent again).
    assert len(labels) > len(table) and set(labels) == {reply_tokens(LABEL_WORDS)}
    assert max(tokens for _, tokens in asked) == reply_tokens(max(DESCRIPTION_WORDS.values()))


def test_offline_default_labels_name_roles_and_rows_hold_facts_and_exemplars(clustered_run, tmp_path, monkeypatch):
    """`adag describe` with defaults on a demo-shaped run (country-capitals prompts): every label is built
    from role words (metadata keys, template tokens, answer, all candidates), never a filler phrase; every
    row holds its cross-prompt facts and the excerpts shown, restricted to the user's turn and the seed."""
    monkeypatch.setenv("ADAG_CACHE", str(tmp_path))
    result = CliRunner().invoke(app, ["describe", str(clustered_run)])
    assert result.exit_code == 0, result.output
    table = RunDir.open(clustered_run).read_table("describe", "descriptions").set_index("cluster")
    view = RunView.open(clustered_run)
    assert len(table) == 3 and (table["status"] == "ok").all()
    strings = [*view.prompts["tokens"], *view.prompts["target_tokens"]]
    template = {w for tokens in strings for t in tokens for w in label_words(t)}
    allowed = template | {w for c in VOCABULARY for w in label_words(c)} | {
        "country", "answer", "alternative", "all", "candidates", "slot", "system", "over", "not", "weak"}
    for _, row in table.iterrows():
        label = re.sub(r"^not\[(.*)\]$", r"\1", row["label"])
        assert "not[" not in label and set(label_words(label.replace("->", " "))) <= allowed, label
        assert grounded(row["label"], row["input_description"]), row["label"]
        assert not re.search(r"\bgroup of\b|\bneurons?\b", label), label
        assert any(f.startswith("layers: layers ") for f in row["facts"]), row["facts"]
        shown = json.loads(row["exemplars"])
        assert shown and {e["part"] for e in shown} <= {"input+", "input-", "output"}
        for e in shown:
            assert len(e["tokens"]) == len(e["values"]) == len(e["highlight"]) and any(e["highlight"])
            if e["part"] != "output":
                assert e["tokens"][0] == "What" and "".join(e["tokens"]).endswith("Answer:")
    # the report shows the excerpts the explainer saw, not excerpts of its own choosing
    report = {c["id"]: c for c in run_payload(RunView.open(clustered_run), [])["clusters"]}
    for cluster, row in table.iterrows():
        shown = json.loads(row["exemplars"])
        assert [(e["prompt"], e["part"]) for e in report[cluster]["exemplars"]] == [(e["prompt"], e["part"])
                                                                                 for e in shown]
        for mine, theirs in zip(report[cluster]["exemplars"], shown):
            assert set(mine["tokens"]) <= set(theirs["tokens"]) and any(mine["highlight"])


def test_one_per_prompt_aggregation_with_the_traces_rule_for_position_0(clustered_run):
    """Describe's records and facts, the report's fallback excerpts and the cluster profiles sum each (unit,
    prompt)'s raw input contributions with `adag.view.prompt_input_sums`; position 0 counts only when the trace
    kept it (`keep_first_position`)."""
    view = RunView.open(clustered_run)
    nodes, clusters, prompt = view.nodes, view.node_cluster, view.nodes["prompt"].to_numpy()
    raw = raw_inputs(nodes)
    for keep_first in (False, True):
        vectors = prompt_input_vectors(nodes, clusters, keep_first)
        assert set(vectors) == set(zip(clusters.tolist(), prompt.tolist()))
        for (cluster, prompt_id), values in vectors.items():
            expected = np.sum([raw[i] for i in np.flatnonzero((clusters == cluster) & (prompt == prompt_id))], axis=0)
            expected[:first_counted_position(keep_first)] = 0.0
            # float64 sums of the same few terms, perhaps in another grouping: a few ulps
            np.testing.assert_allclose(values, expected, rtol=1e-12, atol=1e-12)
        first = np.array([values[0] for values in vectors.values()])
        assert (first != 0).any() if keep_first else (first == 0).all()
        records = input_records(nodes, view.prompts, clusters, keep_first)
        for cluster, items in records.items():
            for record in items:
                assert np.array_equal(record.values, vectors[cluster, record.prompt][record.start:])


def test_a_failing_cluster_leaves_the_stage_unfinished_and_a_rerun_finishes_it(clustered_run, tmp_path, monkeypatch):
    monkeypatch.setenv("ADAG_CACHE", str(tmp_path))
    clustered_run = _without_describe(clustered_run, tmp_path / "run")  # describing 2 of 3 adds to nothing
    refusal = reply_body("I'm sorry, I cannot help with that.")
    with FakeOpenAI([(200, refusal)] * 3) as server:
        spec = f"openai:fake@{server.url}"
        config = DescribeConfig(explainer=spec, simulator=spec, samples=1, attempts=3, clusters=[0, 1])
        with pytest.raises(AdagError, match=r"^1 of 2 clusters failed \(cluster 0: UnusableReply"):
            describe_run(str(clustered_run), config, progress=False, concurrency=1)
        assert RunDir.open(clustered_run).entry("describe") is None
        sent, described = len(server.requests), []
        original = describe_run_module.describe_cluster
        monkeypatch.setattr(describe_run_module, "describe_cluster",
                            lambda cluster, *args: described.append(cluster) or original(cluster, *args))
        # Another concurrency changes no description, so the finished cluster is kept.
        again = describe_run(str(clustered_run), config, progress=False, concurrency=2)
        assert again.facts == {"clusters": 2, "failed": 0}
        assert described == [0]
        assert len(server.requests) > sent  # the refusals were not cached: asked again
        table = RunDir.open(clustered_run).read_table("describe", "descriptions")
        assert sorted(table["cluster"]) == [0, 1] and (table["status"] == "ok").all()


def _without_describe(run: Path, copy: Path) -> Path:
    """A copy of `run` without its describe stage."""
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("describe", ".staging"))
    manifest = json.loads((copy / MANIFEST).read_text())
    manifest["stages"].pop("describe", None)
    (copy / MANIFEST).write_text(json.dumps(manifest))
    return copy


@pytest.fixture(scope="module")
def embed_simulator(tmp_path_factory):
    return make_backend("embed:minilm", "simulator")


@pytest.mark.parametrize("rule", [r for r in RULES if r.name in ("country names", "raises the answer")],
                         ids=lambda r: r.name)
def test_stats_explainer_beats_quoting_baselines_on_unseen_strings(rule, builtin, embed_simulator, tmp_path):
    """The fast subset of benchmarks/describe_eval.py: held-out records hold rule-matching strings the
    explainer never saw, and the stats description beats quoting the top token and the top 3 tokens."""
    config = DescribeConfig()
    simulator = CachedBackend(embed_simulator, tmp_path / "cache.sqlite")
    result = evaluate_rule(rule, builtin.tokenizer, StatsExplainer(), simulator, config)
    assert result.unseen and result.beats_baselines, result
    assert result.true_score > max(result.wrong_score, result.near_score) + 0.2, result


def test_prompt_plumbing_through_the_fake_server(builtin, tmp_path):
    """A stand-in model that reads the prompts: as explainer it lists the highlighted strings, as
    simulator it scores tokens quoted in the description, so a good score needs the excerpts highlighted
    in the last message and the simulator's indices lined up with the tokens. (Records are split as
    `adag describe` splits them, so held-out records hold the same digits.)"""
    with FakeOpenAI(respond=reading_model) as server:
        spec = f"openai:reading@{server.url}"
        config = DescribeConfig(explainer=spec, simulator=spec, samples=2, highlight="topk", highlight_k=1)
        explainer, simulator = make_llms(config, DescribeOptions(), tmp_path / "cache.sqlite")
        digits = next(r for r in RULES if r.name == "digits")
        records = planted_records(digits, dataset_prompts(builtin.tokenizer, digits.datasets), builtin.tokenizer, 0)
        excerpts, held_out = input_split(records, config)
        result = best_description(explainer, simulator, "input", excerpts, held_out, config, "digits")
    assert result.description.startswith("the tokens '") and result.score > 0.5, result


DIGIT_TEXTS = ["I bought 3 apples and 12 pears for 5 dollars", "The train leaves at 7 and arrives at 9 tonight",
               "She has 2 cats, 4 dogs and 1 parrot at home", "Room 42 is on floor 3 of the old building",
               "We walked 10 miles in 6 hours with 8 friends", "Call me at 5 or 6 after the 2 meetings end"]


def test_simulator_sanity_correct_description_beats_wrong_ones(tmp_path):
    """True values are high exactly on digit tokens; the offline embedding simulator must rank the
    right description clearly above wrong ones. (The 135M local chat model cannot: see docs/how-it-works.md.)"""
    records = []
    for i, text in enumerate(DIGIT_TEXTS):
        tokens = [(" " if j else "") + w for j, w in enumerate(text.split())]
        records.append(Record(i, tokens, np.array([10.0 if t.strip().isdigit() else 0.0 for t in tokens])))
    simulator = CachedBackend(make_backend("embed:minilm", "simulator"), tmp_path / "cache.sqlite")
    held_out = HeldOut([r.tokens for r in records], [r.values for r in records])
    right = simulated_score(simulator, "input", "numbers and digits", held_out, 1)
    wrong = [simulated_score(simulator, "input", d, held_out, 1) for d in ("animals", "verbs", "fruit")]
    assert right > 0.6 and right > max(wrong) + 0.5


def test_embedding_simulator_cannot_explain():
    with pytest.raises(AdagError, match="can only be a --simulator"):
        make_backend("embed:minilm", "simulator").complete([], 0.0, 10, False, 0, 1.0)


def _prompts_frame(tokens, text, targets=(" a", " b"), logits=(1.0, 1.0)):
    import pandas as pd

    return pd.DataFrame({"prompt": [0], "tokens": [tokens], "text": [text], "target_tokens": [list(targets)],
                         "target_logits": [list(logits)]})


def test_input_records_sum_raw_contributions_and_drop_the_first_token():
    import pandas as pd

    from adag.describe.records import input_records

    nodes = pd.DataFrame({"prompt": [0, 0, 0], "activation": [2.0, 1.0, 4.0],
                          "input_profile": [np.array([0.5, 0.2, 0.3]), np.array([0.1, 0.6, 0.3]),
                                            np.array([0.9, 0.0, 0.1])]})
    prompts = _prompts_frame(["A", " a", " b"], "A a b")  # a base model's prompt: shown from its first token
    records = input_records(nodes, prompts, np.array([0, 0, 1]))
    assert records[0][0].values.tolist() == pytest.approx([0.0, 0.4 + 0.6, 0.6 + 0.3])
    assert records[1][0].tokens == ["A", " a", " b"]
    kept = input_records(nodes, prompts, np.array([0, 0, 1]), keep_first=True)
    assert kept[0][0].values.tolist() == pytest.approx([1.1, 1.0, 0.9])


def test_input_records_weight_by_activation():
    """Cause 1: shares were summed unweighted, so a near-silent neuron (activation 0.02, share 60) decided
    the highlights; as raw contributions (share x activation) the strongly active neuron's token leads."""
    import pandas as pd

    from adag.describe.records import input_records

    nodes = pd.DataFrame({"prompt": [0, 0], "activation": [4.0, 0.02],
                          "input_profile": [np.array([0.0, 0.0, 0.9, 0.1]), np.array([0.0, 60.0, 0.0, -59.0])]})
    record = input_records(nodes, _prompts_frame(["The", " capital", " France", "?"], "The capital France?"),
                           np.array([0, 0]))[0][0]
    assert record.tokens[int(np.argmax(record.values))] == " France"
    assert record.values.tolist() == pytest.approx([0.0, 1.2, 3.6, 0.4 - 1.18])


def test_output_records_are_in_logit_units():
    """Cause 2: output records were each target's share of its own logit, inflating low-logit candidates;
    now they are the direct effect in logits (share x logit)."""
    import pandas as pd

    from adag.describe.records import output_records

    nodes = pd.DataFrame({"prompt": [0, 0], "output_profile": [np.array([0.1, 0.5]), np.array([0.05, 0.1])]})
    prompts = _prompts_frame(["x"], "x", targets=(" Rome", " Milan"), logits=(20.0, 1.0))
    record = output_records(nodes, prompts, np.array([0, 0]))[0][0]
    assert record.values.tolist() == pytest.approx([3.0, 0.6])  # Rome's push is the larger one in logits


def test_shown_part_is_the_user_turn_and_the_seed():
    """Cause 6: output prompts omitted the seed response, and every excerpt repeated the system prompt."""
    tokens = ["<|im_start|>", "system", "\n", "Be nice.", "<|im_end|>", "\n", "<|im_start|>", "user", "\n", "What",
              " is", " up", "?", "<|im_end|>", "\n", "<|im_start|>", "assistant", "\n", "Answer", ":"]
    prompts = _prompts_frame(tokens, "What is up?")
    assert shown_text(prompts)[0] == "What is up?<|im_end|>\n<|im_start|>assistant\nAnswer:"
    assert shown_start(["What", " is"], "What is") == 0 and shown_start(["x"], "not there") == 0
    excerpts, _ = output_split([Record(0, [" a", " b"], np.array([1.0, -2.0])), Record(0, [" a", " b"],
                                                                                       np.array([0.5, 0.0]))],
                               shown_text(prompts), DescribeConfig())
    assert excerpts[0].render().startswith("Prompt: 'What is up?") and "Answer:' -> ' a'" in excerpts[0].render()


def test_highlights_come_from_the_explainers_records_and_every_excerpt_shows_its_top_token():
    """Cause 4: the threshold was computed on explainer and held-out records together (held-out values
    leaked into what the explainer saw) and most excerpts had no highlight at all."""
    rng = np.random.default_rng(0)
    records = [Record(i, [f" t{j}" for j in range(6)], rng.uniform(0, 1, 6) * (10.0 if i == 0 else 1.0))
               for i in range(40)]
    config = DescribeConfig(highlight_k=1)
    excerpts, held_out = input_split(records, config)
    assert all(e.marked[int(np.argmax(e.values))] for e in excerpts)
    assert all(e.values is not None and len(e.values) == len(e.tokens) for e in excerpts)
    # Changing held-out values (their order in the pool kept) changes nothing the explainer sees.
    held = {r.prompt for r in records} - {e.prompt for e in excerpts}
    louder = [Record(r.prompt, r.tokens, np.where(r.values < r.values.max(), r.values.max() * 0.99, r.values))
              if r.prompt in held else r for r in records]
    again, _ = input_split(louder, config)
    assert [e.marked.tolist() for e in again] == [e.marked.tolist() for e in excerpts]


def test_builtin_run_descriptions_state_coverage_position_layers_and_logit_effects(builtin, tmp_path, monkeypatch):
    """A small traced and clustered run of the built-in model, described offline: each stored row says
    what holds across prompts (coverage n/N, position structure, layer range, effects in logits), its
    output excerpts end in the seed response, and its label is built from roles."""
    monkeypatch.setenv("ADAG_CACHE", str(tmp_path))
    path = tmp_path / "run"
    # Few prompts and nodes: tracing the real model dominates this test's time.
    trace_dataset(builtin, load_dataset("country-capitals", limit=2),
                  TraceConfig(selection="topk", top_nodes=24, edges=False), path, progress=False)
    cluster_run(str(path), ClusterConfig(k=3))
    describe_run(str(path), DescribeConfig(), progress=False)
    table = RunDir.open(path).read_table("describe", "descriptions")
    assert len(table) == 3 and (table["status"] == "ok").all()
    for row in table.itertuples():
        text = "\n".join(row.facts)
        assert re.search(r"top input in \d/[12] prompts", text), text
        assert re.search(r"\d+% of its nodes at the last position; \d+% of their input from their own position", text)
        assert re.search(r"layers: layers \d+-\d+", text) and "logits" in text and "traced metric" in text, text
        assert "logits" in (row.output_description or "") or "no output effect" in text, row.output_description
        assert not re.search(r"not\[.*(not|suppress)", row.label), row.label
