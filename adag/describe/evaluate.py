"""Explainer evaluation on synthetic clusters with a planted rule (benchmarks/describe_eval.py prints it).

Each case builds records in the describe stage's own format from the built-in datasets' real prompts,
tokenised by a real tokenizer (with its chat template, as a trace stores them): values are planted by a
rule (e.g. "fires on digits", "promotes capital cities") times a random strength, plus sparse noise, and
prompts where the rule never applies serve as negatives. The explainer describes the records exactly as
`adag describe` would; its description, the true rule's and a wrong rule's are scored by the simulator
on the same held-out records. Recovered: the description scores within 0.1 of the true rule.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from adag.datasets import PromptRow, format_prompt, load_dataset
from adag.describe.config import DescribeConfig
from adag.describe.explain import Explainer, simulated_score
from adag.describe.records import Record
from adag.describe.run import best_description, input_split, output_split
from adag.llm.backends import CachedBackend

RECOVERED_WITHIN = 0.1
NOISE_RATE, NOISE_SCALE = 0.1, 0.4  # input records: share of tokens with noise, its largest value
OUTPUT_NOISE = 0.15  # output records: standard deviation of the noise on every target


@dataclass(frozen=True)
class Prompt:
    """One dataset prompt as a trace stores it: its row, its token strings and where its question lies."""

    id: int
    dataset: str
    row: PromptRow
    tokens: list[str]
    question: np.ndarray  # per token: inside the user's question (not the chat template)


@dataclass(frozen=True)
class PlantedRule:
    name: str
    kind: Literal["input", "output"]
    datasets: tuple[str, ...]  # prompts used; the rule decides where it applies
    truth: str  # a description of the rule as a good explainer would write it
    wrong: str  # a plausible description of a different rule
    # input: 0/1 per token; output: the target token strings and a signed push per target.
    plant: Callable[[Prompt, Any], np.ndarray | tuple[list[str], np.ndarray]]


def _first_token(tokenizer: Any, text: str) -> str:
    return tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"][:1])


def _in_question(prompt: Prompt, predicate: Callable[[int, str], bool]) -> np.ndarray:
    return np.array([bool(q) and predicate(i, t) for i, (t, q) in enumerate(zip(prompt.tokens, prompt.question))],
                    dtype=float)


def _in_span(prompt: Prompt, phrase: str) -> np.ndarray:
    """Tokens of the question that overlap `phrase`."""
    text = "".join(prompt.tokens)
    start = text.index(prompt.row.prompt) + prompt.row.prompt.index(phrase)
    ends = np.cumsum([len(t) for t in prompt.tokens])
    starts = ends - [len(t) for t in prompt.tokens]
    return ((starts < start + len(phrase)) & (ends > start)).astype(float)


def _last_word(prompt: Prompt) -> np.ndarray:
    mark = [i for i, t in enumerate(prompt.tokens) if prompt.question[i] and "?" in t][-1]
    out = np.zeros(len(prompt.tokens))
    out[mark - 1] = 1.0
    return out


def _targets(prompt: Prompt, tokenizer: Any, pushed: dict[str, float]) -> tuple[list[str], np.ndarray]:
    """Candidate next tokens: the answer's first token, the asked-about word's, and common openers."""
    meta = prompt.row.metadata
    subject = meta.get("country") or meta.get("state") or meta.get("word") or str(meta.get("x", ""))
    candidates = [_first_token(tokenizer, " " + str(meta["answer"])), _first_token(tokenizer, " " + subject)]
    if "city" in meta:
        candidates.append(_first_token(tokenizer, " " + meta["city"]))
    targets = list(dict.fromkeys([*candidates, " The", " It", " A"]))
    role = {targets[0]: "answer", targets[1]: "subject", " The": "the"}
    return targets, np.array([pushed.get(role.get(t, ""), 0.0) for t in targets])


RULES = [
    PlantedRule("digits", "input", ("addition", "antonyms"), "digits of numbers", "names of countries",
                lambda p, tok: _in_question(p, lambda i, t: t.strip().isdigit())),
    PlantedRule("country names", "input", ("country-capitals", "state-capitals"), "names of countries",
                "names of cities in the United States",
                lambda p, tok: _in_span(p, p.row.metadata["country"]) if "country" in p.row.metadata
                else np.zeros(len(p.tokens))),
    PlantedRule("token after 'of'", "input", ("country-capitals", "state-capitals", "antonyms"),
                "the word right after 'of'", "the word 'capital'",
                lambda p, tok: _in_question(p, lambda i, t: i > 0 and p.tokens[i - 1].strip() == "of")),
    PlantedRule("last word of the question", "input", ("state-capitals", "addition", "country-capitals"),
                "the last word of a question, just before \"?\"", "the first word of a question",
                lambda p, tok: _last_word(p)),
    PlantedRule("closing punctuation", "input", ("antonyms", "country-capitals"),
                "question marks \"?\" and closing quotation marks", "opening quotation marks",
                lambda p, tok: _in_question(p, lambda i, t: t.strip() in {"?", '"?', '"', ")", "]"}
                                            and not t.startswith(" "))),
    PlantedRule("pushes capital cities", "output", ("country-capitals", "antonyms"),
                "promotes names of capital cities", "promotes names of countries",
                lambda p, tok: _targets(p, tok, {"answer": 1.0} if p.dataset == "country-capitals" else {})),
    PlantedRule("suppresses ' The'", "output", ("country-capitals", "antonyms", "addition"),
                "suppresses the word 'The'", "promotes the word 'The'",
                lambda p, tok: _targets(p, tok, {"the": -1.0})),
    PlantedRule("pushes US states", "output", ("state-capitals", "country-capitals"),
                "promotes names of US states", "promotes names of European countries",
                lambda p, tok: _targets(p, tok, {"subject": 1.0} if p.dataset == "state-capitals" else {})),
]


def dataset_prompts(tokenizer: Any, datasets: tuple[str, ...]) -> list[Prompt]:
    """The datasets' prompts as token strings of the tokenizer's chat-formatted text."""
    prompts = []
    for dataset in datasets:
        for row in load_dataset(dataset).rows:
            text = format_prompt(tokenizer, row)
            has_template = bool(getattr(tokenizer, "chat_template", None))
            ids = tokenizer(text, add_special_tokens=not has_template)["input_ids"]
            tokens = [tokenizer.decode([i]) for i in ids]
            joined = "".join(tokens)
            start = joined.index(row.prompt)
            ends = np.cumsum([len(t) for t in tokens])
            question = (ends > start) & (ends - [len(t) for t in tokens] < start + len(row.prompt))
            prompts.append(Prompt(len(prompts), dataset, row, tokens, question))
    return prompts


def planted_records(rule: PlantedRule, prompts: list[Prompt], tokenizer: Any, seed: int) -> list[Record]:
    """One record per prompt: the rule's pattern times a strength in [0.5, 1], plus noise. Input records
    get sparse non-negative noise and a zero first token (the sink, as a trace leaves it)."""
    rng = np.random.default_rng(seed)
    records = []
    for prompt in prompts:
        planted = rule.plant(prompt, tokenizer)
        if rule.kind == "input":
            noise = rng.uniform(0, NOISE_SCALE, len(planted)) * (rng.random(len(planted)) < NOISE_RATE)
            values = planted * rng.uniform(0.5, 1.0) + noise
            values[0] = 0.0
            records.append(Record(prompt.id, prompt.tokens, values))
        else:
            targets, push = planted
            records.append(Record(prompt.id, targets, push * rng.uniform(0.5, 1.0)
                                  + rng.normal(0, OUTPUT_NOISE, len(push))))
    return records


@dataclass
class CaseResult:
    rule: str
    kind: str
    description: str
    score: float | None
    true_score: float | None
    wrong_score: float | None

    @property
    def recovered(self) -> bool:
        return None not in (self.score, self.true_score) and self.score >= self.true_score - RECOVERED_WITHIN


def evaluate_rule(rule: PlantedRule, tokenizer: Any, explainer: Explainer, simulator: CachedBackend,
                  config: DescribeConfig) -> CaseResult:
    prompts = dataset_prompts(tokenizer, rule.datasets)
    records = planted_records(rule, prompts, tokenizer, config.seed)
    if rule.kind == "input":
        excerpts, held_out = input_split(records, config)
    else:
        excerpts, held_out = output_split(records, {p.id: p.row.prompt for p in prompts}, config)
    best = best_description(explainer, simulator, rule.kind, excerpts, held_out, config, rule.name)
    true_score, wrong_score = (simulated_score(simulator, rule.kind, d, held_out, config.attempts)
                               for d in (rule.truth, rule.wrong))
    return CaseResult(rule.name, rule.kind, best.description, best.score, true_score, wrong_score)
