import numpy as np
import pytest

from adag.cluster import ClusterConfig, cluster_run
from adag.datasets import load_dataset
from adag.describe import CachedBackend, DescribeConfig, describe_run
from adag.describe.explain import UnusableReply, correlation, simulate
from adag.describe.llm import OpenAIBackend, expected_score, make_backend
from adag.describe.records import (
    Record,
    exemplar_pool,
    highlight,
    normalised_scores,
    quantile_walk_threshold,
    sign_part,
    top_k_mask,
)
from adag.errors import AdagError
from adag.store import RunDir
from adag.trace import TraceConfig, trace_dataset
from tests.fake_openai import FakeOpenAI, reply_body


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


def _backend(server, tmp_path, **kw):
    return CachedBackend(OpenAIBackend("fake", base_url=server.url, max_retries=2, **kw), tmp_path / "cache.sqlite")


def test_rate_limit_then_success_and_cache_hit(tmp_path):
    with FakeOpenAI([(429, {"error": {"message": "slow down"}}), (200, reply_body("hello"))]) as server:
        backend = _backend(server, tmp_path)
        messages = [{"role": "user", "content": "hi"}]
        assert backend.complete(messages, "test").text == "hello"
        assert len(server.requests) == 2  # the 429 was retried
        assert backend.complete(messages, "test").text == "hello"
        assert len(server.requests) == 2  # served from the cache: no request sent
        assert [e.cached for e in backend.ledger] == [False, True]
        assert backend.ledger[0].input_tokens == 10


def test_simulator_uses_logprobs_when_present_and_integers_when_absent(tmp_path):
    tokens = [("[", {"[": 0.0}), ("2", {"2": np.log(0.5), "4": np.log(0.5)}), (",", {",": 0.0}),
              ("8", {"8": 0.0}), ("]", {"]": 0.0})]
    with FakeOpenAI([(200, reply_body("[2, 8]", tokens)), (200, reply_body("[2, 8]"))]) as server:
        backend = _backend(server, tmp_path)
        with_logprobs = simulate(backend, "numbers", ["a", "b"], "input", sample=0)
        assert with_logprobs.tolist() == pytest.approx([3.0, 8.0])
        assert server.requests[0]["logprobs"] is True
        without = simulate(backend, "numbers", ["a", "b"], "input", sample=1)
        assert without.tolist() == [2.0, 8.0]


def test_malformed_and_wrong_length_replies_are_unusable(tmp_path):
    with FakeOpenAI([(200, reply_body("I think they are all high")), (200, reply_body("[1, 2, 3]"))]) as server:
        backend = _backend(server, tmp_path)
        with pytest.raises(UnusableReply, match="no JSON list"):
            simulate(backend, "x", ["a", "b"], "input", sample=0)
        with pytest.raises(UnusableReply, match="3 values for 2"):
            simulate(backend, "x", ["a", "b"], "input", sample=1)


def test_missing_key_and_unknown_backend(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    with pytest.raises(AdagError, match="set OPENAI_API_KEY"):
        make_backend("openai:gpt-4o-mini")
    with pytest.raises(AdagError, match="set ANTHROPIC_API_KEY"):
        make_backend("anthropic:claude")
    with pytest.raises(AdagError, match="unknown backend 'gemini:x'"):
        make_backend("gemini:x")


@pytest.fixture(scope="module")
def clustered_run(tiny_models, tmp_path_factory):
    path = tmp_path_factory.mktemp("run")
    trace_dataset(tiny_models["llama"], load_dataset("country-capitals", limit=6), TraceConfig(threshold=0.03),
                  path, progress=False)
    cluster_run(str(path), ClusterConfig(k=3))
    return path


def test_describe_stage_end_to_end_resumes_from_cache(clustered_run, tmp_path, monkeypatch):
    monkeypatch.setenv("ADAG_CACHE", str(tmp_path))
    with FakeOpenAI() as server:
        spec = f"openai:fake@{server.url}"
        config = DescribeConfig(explainer=spec, simulator=spec, samples=2, concurrency=2)
        estimate = describe_run(str(clustered_run), config, dry_run=True)
        assert estimate["calls"] > 0 and not server.requests
        result = describe_run(str(clustered_run), config, progress=False)
        assert result == {"clusters": 3, "failed": 0}
        table = RunDir.open(clustered_run).read_table("describe", "descriptions")
        assert set(table["input_description"]) == {"names of countries"}
        assert table["label"].str.fullmatch(r"(not\[)?capital city\]?").all()
        assert table["input_score"].notna().any()
        sent = len(server.requests)
        assert sent > 0
        describe_run(str(clustered_run), config.model_copy(update={"clusters": None}), progress=False)
        assert len(server.requests) == sent  # a rerun is served from the cache


def test_a_failing_cluster_is_recorded_and_the_run_goes_on(clustered_run, tmp_path, monkeypatch):
    monkeypatch.setenv("ADAG_CACHE", str(tmp_path))
    refusal = reply_body("I'm sorry, I cannot help with that.")
    with FakeOpenAI([(200, refusal)] * 3) as server:
        spec = f"openai:fake@{server.url}"
        config = DescribeConfig(explainer=spec, simulator=spec, samples=1, concurrency=1, attempts=3, clusters=[0, 1])
        result = describe_run(str(clustered_run), config, progress=False)
    table = RunDir.open(clustered_run).read_table("describe", "descriptions").set_index("cluster")
    assert result["failed"] == 1
    assert table.loc[0, "status"] == "failed" and "UnusableReply" in table.loc[0, "failure"]
    assert table.loc[1, "status"] == "ok"


DIGIT_TEXTS = ["I bought 3 apples and 12 pears for 5 dollars", "The train leaves at 7 and arrives at 9 tonight",
               "She has 2 cats, 4 dogs and 1 parrot at home", "Room 42 is on floor 3 of the old building",
               "We walked 10 miles in 6 hours with 8 friends", "Call me at 5 or 6 after the 2 meetings end"]


def test_simulator_sanity_correct_description_beats_wrong_ones(tmp_path):
    """True values are high exactly on digit tokens; the offline embedding simulator must rank the
    right description clearly above wrong ones. (The 135M local chat model cannot: see README.)"""
    from adag.describe.explain import score_input_description

    records = []
    for i, text in enumerate(DIGIT_TEXTS):
        tokens = [(" " if j else "") + w for j, w in enumerate(text.split())]
        records.append(Record(i, tokens, np.array([10.0 if t.strip().isdigit() else 0.0 for t in tokens])))
    simulator = CachedBackend(make_backend("embed:minilm"), tmp_path / "cache.sqlite")
    right = score_input_description(simulator, "numbers and digits", records)
    wrong = [score_input_description(simulator, d, records) for d in ("animals", "verbs of motion", "fruit")]
    assert right > 0.6 and right > max(wrong) + 0.5


def test_embedding_simulator_cannot_explain():
    with pytest.raises(AdagError, match="can only be a --simulator"):
        make_backend("embed:minilm").complete([], 0.0, 10, False)


def test_input_records_sum_members_and_drop_the_first_token():
    import pandas as pd

    from adag.describe.records import input_records

    nodes = pd.DataFrame({"prompt": [0, 0, 0], "input_profile": [np.array([0.5, 0.2, 0.3]),
                                                                 np.array([0.1, 0.6, 0.3]),
                                                                 np.array([0.9, 0.0, 0.1])]})
    prompts = pd.DataFrame({"prompt": [0], "tokens": [["<s>", " a", " b"]]})
    records = input_records(nodes, prompts, np.array([0, 0, 1]))
    assert records[0][0].values.tolist() == pytest.approx([0.0, 0.8, 0.6])
    assert records[1][0].tokens == ["<s>", " a", " b"]
    kept = input_records(nodes, prompts, np.array([0, 0, 1]), keep_first=True)
    assert kept[0][0].values.tolist() == pytest.approx([0.6, 0.8, 0.6])
