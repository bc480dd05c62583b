import json
import re

import pytest

from adag.datasets import BUILTIN_DATASETS, PromptRow, encode_prompt, format_prompt, label_token_ids, load_dataset
from adag.datasets.builtin import STATE_CITIES
from adag.datasets.misleading import FRAMINGS, WRONG_KINDS, study_check
from adag.errors import AdagError


def test_builtin_sizes():
    assert len(load_dataset("country-capitals")) >= 40
    assert len(load_dataset("state-capitals")) == 50
    assert len(load_dataset("addition")) == 100
    assert len(load_dataset("antonyms")) >= 20
    assert 150 <= len(load_dataset("misleading-capitals")) <= 200
    assert set(BUILTIN_DATASETS) == {"country-capitals", "state-capitals", "addition", "antonyms",
                                     "misleading-capitals"}


def test_state_cities_are_unique_and_never_the_capital():
    cities = [city for city, _ in STATE_CITIES.values()]
    assert len(set(cities)) == 50
    assert all(city != capital for city, capital in STATE_CITIES.values())
    row = load_dataset("state-capitals").rows[0]
    assert row.prompt.startswith("What is the capital of the state containing ")


@pytest.mark.parametrize("limit", [0, -1, -50])
def test_limit_below_one_is_refused(limit):
    with pytest.raises(AdagError, match=rf"limit must be at least 1 \(got {limit}\); leave it out"):
        load_dataset("addition", limit=limit)


def test_limit_above_size_keeps_every_row():
    assert len(load_dataset("antonyms", limit=10_000)) == len(load_dataset("antonyms"))


def test_limit_and_hash_is_stable():
    a, b = load_dataset("addition", limit=5), load_dataset("addition", limit=5)
    assert len(a) == 5 and a.sha256 == b.sha256
    assert a.sha256 != load_dataset("addition", limit=6).sha256


def test_jsonl_and_csv(tmp_path):
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text(json.dumps({"prompt": "Hi", "labels": [" A"], "metadata": {"asr": 0.5}}) + "\n\n")
    rows = load_dataset(str(jsonl)).rows
    assert rows == [PromptRow(prompt="Hi", labels=[" A"], metadata={"asr": 0.5})]
    csv = tmp_path / "d.csv"
    csv.write_text('prompt,seed_response,labels,asr\nHello,Answer:,"["" A"", "" B""]",0.3\nBye,,,0.1\n')
    rows = load_dataset(str(csv)).rows
    assert rows[0].labels == [" A", " B"] and rows[0].metadata == {"asr": 0.3}
    assert rows[1].labels == [] and rows[1].seed_response == ""


@pytest.mark.parametrize("content, message", [
    ('{"prompt": "ok"}\n{"prompt": "bad"\n', "line 2: not valid JSON"),
    ('{"seed_response": "x"}\n', "line 1: missing field 'prompt'"),
    ('{"prompt": "  "}\n', "line 1: prompt is empty"),
    ('{"prompt": "x", "metadata": {"asr": NaN}}\n', "line 1: metadata 'asr' holds nan, not a finite number"),
    ('{"prompt": "x", "metadata": {"asr": -Infinity}}\n', "metadata 'asr' holds -inf, not a finite number"),
    ('{"prompt": "x", "metadata": {"asr": 1e999}}\n', "metadata 'asr' holds inf, not a finite number"),
    ('{"prompt": "x", "metadata": {"runs": [0.1, {"asr": NaN}]}}\n', "metadata 'runs' holds"),
    ('{"prompt": "x", "label": ["a"]}\n', "line 1: extra inputs are not permitted 'label'"),
    ('["x"]\n', "line 1: expected an object"),
])
def test_malformed_jsonl_names_row_and_problem(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(AdagError) as error:
        load_dataset(str(path))
    assert message in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("kind", ["directory", "loop", "dangling link"])
def test_dataset_path_that_is_no_file_is_named_as_such(tmp_path, kind):
    path = tmp_path / "data.jsonl"
    if kind == "directory":
        path.mkdir()
    elif kind == "loop":
        path.symlink_to(tmp_path / "other.jsonl")
        (tmp_path / "other.jsonl").symlink_to(path)
    else:
        path.symlink_to(tmp_path / "gone.jsonl")
    expected = {"directory": f"dataset '{path}' is a directory; pass a .jsonl or .csv file",
                "loop": f"{path} is a symbolic link loop", "dangling link": "gone.jsonl, which does not exist"}[kind]
    message = _load_error(path)
    assert expected in message and "unknown dataset" not in message


def test_unknown_dataset_and_file_type(tmp_path):
    with pytest.raises(AdagError, match="unknown dataset 'nope'"):
        load_dataset("nope")
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(AdagError, match="unsupported file type"):
        load_dataset(str(tmp_path / "d.txt"))


def test_label_must_be_one_token(tokenizer):
    row = PromptRow(prompt="x", labels=[" capital", " Washingtonians-and-more"])
    with pytest.raises(AdagError, match=r"row 3: label ' Washingtonians-and-more' is \d+ tokens"):
        label_token_ids(tokenizer, row, 3)
    single = tokenizer.convert_ids_to_tokens(tokenizer(" capital", add_special_tokens=False)["input_ids"])
    assert len(single) == 1
    assert len(label_token_ids(tokenizer, PromptRow(prompt="x", labels=[" capital"]), 0)) == 1


def test_chat_template_and_plain_formatting(tokenizer):
    row = PromptRow(prompt="What is 2 + 2?", seed_response="Answer:")
    text = format_prompt(tokenizer, row)
    assert text.startswith("<|im_start|>user\nWhat is 2 + 2?<|im_end|>") and text.endswith("assistant\nAnswer:")
    assert encode_prompt(tokenizer, row)[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")
    template, tokenizer.chat_template = tokenizer.chat_template, None
    try:
        assert format_prompt(tokenizer, row) == "What is 2 + 2? Answer:"
    finally:
        tokenizer.chat_template = template


@pytest.fixture
def base_tokenizer(tokenizer):
    """The test tokenizer as a base model's: no chat template."""
    template, tokenizer.chat_template = tokenizer.chat_template, None
    yield tokenizer
    tokenizer.chat_template = template


def test_base_model_prompts_follow_the_base_template(base_tokenizer):
    row = PromptRow(prompt="What is 2 + 2?", seed_response="Answer:")
    assert format_prompt(base_tokenizer, row, base_template="Q: {prompt}\nA:") == "Q: What is 2 + 2?\nA:"
    assert format_prompt(base_tokenizer, row, base_template="{seed_response} {prompt}") == "Answer: What is 2 + 2?"
    assert format_prompt(base_tokenizer, PromptRow(prompt="The capital of France is")) == "The capital of France is"
    with pytest.raises(AdagError, match="--prompt-format chat: this model's tokenizer has no chat template"):
        format_prompt(base_tokenizer, row, "chat")


def test_plain_format_on_a_chat_model_skips_its_template(tokenizer):
    row = PromptRow(prompt="What is 2 + 2?", seed_response="Answer:")
    assert format_prompt(tokenizer, row, "plain") == "What is 2 + 2? Answer:"
    assert "<|im_start|>" not in tokenizer.decode(encode_prompt(tokenizer, row, "plain"))


@pytest.mark.parametrize("template, problem", [
    ("Q: {question}", "must contain {prompt}"), ("{seed_response}", "must contain {prompt}"),
    ("{prompt} {answer}", "no other fields (found answer, prompt)"), ("{prompt", "not a valid format string"),
])
def test_bad_base_templates_are_refused_where_declared(template, problem):
    from pydantic import ValidationError

    from adag.trace import TraceConfig

    with pytest.raises(ValidationError, match=re.escape(problem)):
        TraceConfig(base_template=template)


def test_conversations_for_a_base_model_are_a_plain_transcript(base_tokenizer, tokenizer):
    from adag.datasets import format_messages

    messages = [{"role": "system", "content": "Describe."}, {"role": "user", "content": "a, b"},
                {"role": "assistant", "content": "letters"}, {"role": "user", "content": "c"}]
    assert format_messages(base_tokenizer, messages) == \
        "Describe.\n\nUser: a, b\n\nAssistant: letters\n\nUser: c\n\nAssistant:"


def test_a_trace_of_a_base_model_records_its_format_and_the_exact_text(tiny_models, tmp_path):
    """The prompts table holds the text exactly as traced (decoded from the traced ids), and the
    manifest records which format made it: plain for a base model, chat otherwise."""
    import copy
    from dataclasses import replace

    from adag.store import RunDir
    from adag.trace import TraceConfig, trace_dataset

    chat = tiny_models["llama"]
    base = replace(chat, tokenizer=copy.deepcopy(chat.tokenizer))
    base.tokenizer.chat_template = None
    dataset = load_dataset("country-capitals", limit=2)
    config = TraceConfig(threshold=0.05, edges=False, base_template="Q: {prompt}\nA:")
    for lm, name, expected in ((base, "base", "plain"), (chat, "chat", "chat")):
        run = trace_dataset(lm, dataset, config, tmp_path / name, progress=False)
        prompts = run.read_table("trace", "prompts")
        assert RunDir.open(tmp_path / name).manifest["stages"]["trace"]["prompt_format"] == expected
        assert prompts["traced_text"].tolist() == [lm.tokenizer.decode(ids) for ids in prompts["token_ids"]]
    assert prompts["traced_text"][0].startswith("<|im_start|>user\nWhat is the capital of France?")
    assert RunDir.open(tmp_path / "base").read_table("trace", "prompts")["traced_text"].tolist() == [
        f"Q: {row.prompt}\nA:" for row in dataset.rows]


def _load_error(path) -> str:
    with pytest.raises(AdagError) as error:
        load_dataset(str(path))
    message = str(error.value)
    assert "\n" not in message and str(path) in message
    return message


@pytest.mark.parametrize("content, message", [
    # The case: 4 rows in, one unterminated quote; a lenient parser returns 2 rows.
    ('prompt,asr\nA,1\n"B,2\nC,3\nD,4\n', "line 3: malformed quoting (unexpected end of data)"),
    ('prompt,asr\nA,1\n"B,2\nC,3\n"D",4\n', "line 3: malformed quoting (',' expected after '\"')"),
    ('prompt,asr\nA,1,extra\n', "line 2: 3 fields but the header has 2"),
    ('prompt,asr\nA\n', "line 2: 1 fields but the header has 2"),
    ('prompt,asr,prompt\nA,1,B\n', "line 1: column 'prompt' appears more than once"),
    ('prompt,asr\nA,0.5\nB,NaN\n', "line 3: column 'asr' is numeric but holds nan"),
    ('prompt,asr\nA,-inf\nB,1e-3\n', "line 2: column 'asr' is numeric but holds -inf"),
])
def test_malformed_csv_is_one_line_naming_the_line(tmp_path, content, message):
    path = tmp_path / "bad.csv"
    path.write_text(content)
    assert message in _load_error(path)


def test_csv_keeps_quoted_line_breaks_and_words_that_spell_numbers(tmp_path):
    """Multi-line prompts are legal CSV; a text column may hold "infinity" (only numeric columns are checked)."""
    path = tmp_path / "ok.csv"
    path.write_text('prompt,word,asr\n"Two lines,\nstill one prompt",infinity,0.5\nB,nan,\n')
    rows = load_dataset(str(path)).rows
    assert [row.prompt for row in rows] == ["Two lines,\nstill one prompt", "B"]
    assert rows[0].metadata == {"word": "infinity", "asr": 0.5} and rows[1].metadata["asr"] is None


@pytest.mark.parametrize("suffix, content", [
    (".csv", "prompt,asr\nHi,0.5\n"),
    (".jsonl", '{"prompt": "Hi", "metadata": {"asr": 0.5}}\n'),
])
def test_utf8_byte_order_mark_is_skipped(tmp_path, suffix, content):
    path = tmp_path / f"bom{suffix}"
    path.write_bytes(b"\xef\xbb\xbf" + content.encode())
    assert load_dataset(str(path)).rows == [PromptRow(prompt="Hi", metadata={"asr": 0.5})]


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_invalid_utf8_names_line_and_byte(tmp_path, suffix):
    path = tmp_path / f"latin1{suffix}"
    first = "prompt\n" if suffix == ".csv" else '{"prompt": "ok"}\n'
    path.write_bytes(first.encode() + '{"prompt": "caf\u00e9"}\n'.encode("latin-1"))
    offset = len(first) + len('{"prompt": "caf')
    assert f"line 2: not valid UTF-8 (byte {offset} is 0xe9); save the file as UTF-8" in _load_error(path)


def test_jsonl_string_with_unicode_line_separator_is_one_row(tmp_path):
    path = tmp_path / "sep.jsonl"
    path.write_text(json.dumps({"prompt": "a\u2028b"}, ensure_ascii=False) + "\n", encoding="utf-8")
    assert load_dataset(str(path)).rows[0].prompt == "a\u2028b"


def test_misleading_capitals_rows_carry_their_parts():
    """Six rows a country (a control and one per framing), the parts in metadata, the claim in the prompt."""
    rows = load_dataset("misleading-capitals").rows
    countries = [row.metadata["country"] for row in rows]
    assert len(set(countries)) >= 30 and len(rows) == len(FRAMINGS) * len(set(countries))
    assert countries == sorted(countries, key=countries.index), "rows are grouped by country"
    for row in rows:
        meta = row.metadata
        assert set(meta) == {"framing", "wrong_kind", "country", "correct", "misleading"}
        assert meta["framing"] in FRAMINGS and row.prompt.endswith(f"What is the capital of {meta['country']}?")
        assert meta["correct"] != meta["misleading"] and row.seed_response == "Answer:"
        assert len(row.labels) == 2 and row.labels[0] != row.labels[1]
        if meta["framing"] == "none":
            assert meta["wrong_kind"] == "none" and meta["misleading"] not in row.prompt
        else:
            assert meta["wrong_kind"] in WRONG_KINDS
            assert f"the capital of {meta['country']} is {meta['misleading']}. " in row.prompt
    misled = [row.metadata for row in rows if row.metadata["framing"] != "none"]
    for framing in set(FRAMINGS) - {"none"}:
        kinds = [m["wrong_kind"] for m in misled if m["framing"] == framing]
        assert max(map(kinds.count, WRONG_KINDS)) - min(map(kinds.count, WRONG_KINDS)) <= 1, framing


def test_misleading_capitals_is_deterministic_and_limit_keeps_whole_countries():
    assert load_dataset("misleading-capitals").sha256 == load_dataset("misleading-capitals").sha256
    rows = load_dataset("misleading-capitals", limit=6 * len(FRAMINGS)).rows
    assert len({row.metadata["country"] for row in rows}) == 6


def test_misleading_capitals_uses_only_countries_that_passed_the_check():
    check = study_check()
    passed = {entry["country"] for entry in check["checks"] if entry["passed"]}
    assert check["passed"] == len(passed) and len(check["study"]) >= 30
    assert {entry["country"] for entry in check["study"]} <= passed


@pytest.mark.builtin
def test_misleading_capitals_labels_are_distinct_single_tokens(builtin):
    """Each label is one token of the built-in tokenizer, the first token of its city's name."""
    for index, row in enumerate(load_dataset("misleading-capitals").rows):
        correct, misleading = label_token_ids(builtin.tokenizer, row, index)
        assert correct != misleading
        for token_id, name in ((correct, row.metadata["correct"]), (misleading, row.metadata["misleading"])):
            assert builtin.tokenizer(" " + name, add_special_tokens=False)["input_ids"][0] == token_id


@pytest.mark.builtin
def test_misleading_capitals_check_reproduces(builtin):
    """Rerunning the check on three recorded countries gives the recorded probabilities. They were rounded
    to 4 decimals; float32 logits summed in another order move a probability by far less than 1e-4."""
    from scripts.misleading_check import check_country

    recorded = {entry["country"]: entry for entry in study_check()["checks"]}
    for entry in study_check()["study"][:3]:
        again = check_country(builtin, entry["country"], entry["capital"])
        assert again["passed"] and abs(again["p_capital"] - recorded[entry["country"]]["p_capital"]) <= 2e-4


@pytest.mark.parametrize("content, message", [
    ('{"prompt": "Hi", "metadata": {"x": ' + "9" * 5000 + "}}\n", "an integer of more than 4300 digits"),
    ('{"prompt": "Hi", "metadata": {"x": ' + "[" * 65 + "]" * 65 + "}}\n", "nested more than 64 levels deep"),
    ('{"prompt": "Hi", "prompt": "Ho"}\n', "key 'prompt' appears twice in one object"),
    ('{"prompt": "Hi\\ud800"}\n', "lone surrogate (U+D800 at character 2)"),
    ('{"prompt": "\\u200b\\u202e"}\n', "prompt is empty (only whitespace or invisible characters"),
])
def test_jsonl_rows_that_cannot_be_used_are_one_line(tmp_path, content, message):
    path = tmp_path / "rows.jsonl"
    path.write_text(content)
    assert message in _load_error(path)
