import json

import pytest

from adag.datasets import BUILTIN_DATASETS, PromptRow, encode_prompt, format_prompt, label_token_ids, load_dataset
from adag.datasets.builtin import STATE_CITIES
from adag.errors import AdagError


def test_builtin_sizes():
    assert len(load_dataset("country-capitals")) >= 40
    assert len(load_dataset("state-capitals")) == 50
    assert len(load_dataset("addition")) == 100
    assert len(load_dataset("antonyms")) >= 20
    assert set(BUILTIN_DATASETS) == {"country-capitals", "state-capitals", "addition", "antonyms"}


def test_state_cities_are_unique_and_never_the_capital():
    cities = [city for city, _ in STATE_CITIES.values()]
    assert len(set(cities)) == 50
    assert all(city != capital for city, capital in STATE_CITIES.values())
    row = load_dataset("state-capitals").rows[0]
    assert row.prompt.startswith("What is the capital of the state containing ")


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
    assert rows[0].labels == [" A", " B"] and rows[0].metadata == {"asr": "0.3"}
    assert rows[1].labels == [] and rows[1].seed_response == ""


@pytest.mark.parametrize("content, message", [
    ('{"prompt": "ok"}\n{"prompt": "bad"\n', "line 2: not valid JSON"),
    ('{"seed_response": "x"}\n', "line 1: missing field 'prompt'"),
    ('{"prompt": "  "}\n', "line 1: value error, prompt is empty 'prompt'"),
    ('{"prompt": "x", "label": ["a"]}\n', "line 1: extra inputs are not permitted 'label'"),
    ('["x"]\n', "line 1: expected an object"),
])
def test_malformed_jsonl_names_row_and_problem(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(AdagError) as error:
        load_dataset(str(path))
    assert message in str(error.value) and "\n" not in str(error.value)


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
