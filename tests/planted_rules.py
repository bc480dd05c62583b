"""Explainer evaluation on synthetic clusters with a planted rule, for tests and benchmarks/describe_eval.py
(which prints it); not part of the package.

Each case builds records in the describe stage's own format from the built-in datasets' real prompts,
tokenised by a real tokenizer (with its chat template, as a trace stores them; records keep the shown
part, the user's turn and the seed): values are planted by a rule (e.g. "fires on digits", "raises the
answer") times a random strength, plus sparse noise, and prompts where the rule never applies serve as
negatives. The demo's confounds are planted too: a template token at the last position carries a weak
value in every prompt, and output values are logits on per-prompt candidates, with pairs of rules on the
same inputs and opposite outputs. Held-out records are chosen so that their rule-matching strings were
never shown to the explainer (new countries, new digits) wherever the rule allows it.

The explainer describes the shown records exactly as `adag describe` would. Its description, two
baselines built from the same shown records (quote the top token; quote the top 3 tokens), the true
rule, a wrong rule and a near-miss wrong rule are all scored by the same simulator on the same held-out
records. Recovered: beats both baselines by MARGIN and is within 0.1 of the true rule.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd

from adag.datasets import PromptRow, format_prompt, load_dataset
from adag.describe.config import DescribeConfig
from adag.describe.explain import Explainer, HeldOut, Scored, simulated_score
from adag.describe.records import Record, exemplar_pool, shown_start
from adag.describe.roles import Roles, name_of, prompt_roles
from adag.describe.run import best_description, input_excerpts, output_excerpts, output_held_out
from adag.llm.cache import CachedBackend
from adag.llm.roles import UnusableReply

RECOVERED_WITHIN = 0.1
MARGIN = 0.05  # how much a recovered description must beat both baselines by
NOISE_RATE, NOISE_SCALE = 0.1, 0.4  # input records: share of tokens with noise, its largest value
TEMPLATE_CONFOUND = 0.35  # input records: value on the last token (a template token) in every prompt
OUTPUT_NOISE = 0.15  # output records: standard deviation of the noise on every target, in logits
LOGITS = 3.0  # output records: a planted push of 1 is this many logits


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
    near: str  # a near miss: a description of a similar but different rule
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
                "words describing size or temperature",
                lambda p, tok: _in_question(p, lambda i, t: t.strip().isdigit())),
    PlantedRule("country names", "input", ("country-capitals", "state-capitals"), "names of countries",
                "names of cities in the United States", "names of capital cities",
                lambda p, tok: _in_span(p, p.row.metadata["country"]) if "country" in p.row.metadata
                else np.zeros(len(p.tokens))),
    PlantedRule("token after 'of'", "input", ("country-capitals", "state-capitals", "antonyms"),
                "the word right after 'of'", "the word 'capital'", "the word right before '?'",
                lambda p, tok: _in_question(p, lambda i, t: i > 0 and p.tokens[i - 1].strip() == "of")),
    PlantedRule("last word of the question", "input", ("state-capitals", "addition", "country-capitals"),
                "the last word of a question, just before \"?\"", "the first word of a question",
                "the word right after 'of'", lambda p, tok: _last_word(p)),
    PlantedRule("closing punctuation", "input", ("antonyms", "country-capitals"),
                "question marks \"?\" and closing quotation marks", "opening quotation marks",
                "the colon after Answer",
                lambda p, tok: _in_question(p, lambda i, t: t.strip() in {"?", '"?', '"', ")", "]"}
                                            and not t.startswith(" "))),
    PlantedRule("raises the answer", "output", ("country-capitals", "antonyms"),
                "promotes names of capital cities", "promotes names of countries", "suppresses names of capital cities",
                lambda p, tok: _targets(p, tok, {"answer": 1.0} if p.dataset == "country-capitals" else {})),
    PlantedRule("lowers the answer", "output", ("country-capitals", "antonyms"),
                "suppresses names of capital cities", "promotes the word 'The'", "promotes names of capital cities",
                lambda p, tok: _targets(p, tok, {"answer": -1.0} if p.dataset == "country-capitals" else {})),
    PlantedRule("suppresses ' The'", "output", ("country-capitals", "antonyms", "addition"),
                "suppresses the word 'The'", "promotes names of capital cities", "promotes the word 'The'",
                lambda p, tok: _targets(p, tok, {"the": -1.0})),
    PlantedRule("pushes US states", "output", ("state-capitals", "country-capitals"),
                "promotes names of US states", "promotes names of European countries", "promotes names of US cities",
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
    """One record per prompt, over its shown part: the rule's pattern times a strength in [0.5, 1], plus
    noise. Input records get sparse non-negative noise and the template confound on the last token;
    output records are logits with noise on every candidate."""
    rng = np.random.default_rng(seed)
    records = []
    for prompt in prompts:
        planted = rule.plant(prompt, tokenizer)
        if rule.kind == "input":
            noise = rng.uniform(0, NOISE_SCALE, len(planted)) * (rng.random(len(planted)) < NOISE_RATE)
            values = planted * rng.uniform(0.5, 1.0) + noise
            values[-1] += TEMPLATE_CONFOUND * rng.uniform(0.5, 1.0)
            start = shown_start(prompt.tokens, prompt.row.prompt)
            records.append(Record(prompt.id, prompt.tokens[start:], values[start:], start))
        else:
            targets, push = planted
            records.append(Record(prompt.id, targets, LOGITS * (push * rng.uniform(0.5, 1.0)
                                                                + rng.normal(0, OUTPUT_NOISE, len(push)))))
    return records


def matching(rule: PlantedRule, prompt: Prompt, tokenizer: Any) -> set[str]:
    """The token strings where the rule applies in a prompt (input tokens, or pushed targets)."""
    planted = rule.plant(prompt, tokenizer)
    units, values = (prompt.tokens, planted) if rule.kind == "input" else planted
    return {u.strip() for u, v in zip(units, values) if v != 0}


def unseen_split(rule: PlantedRule, prompts: list[Prompt], records: list[Record], tokenizer: Any, config: DescribeConfig
                 ) -> tuple[list[Record], list[Record], bool]:
    """Records for the explainer and held-out records whose rule-matching strings the explainer never
    sees: the matching strings are split in two halves, and a record goes to the side that holds all of
    its strings. Where that leaves no positive held-out record (a rule on one string in every prompt),
    records alternate instead. Each side is pooled as `adag describe` pools (top records plus randoms).
    The last value says whether held-out strings are unseen."""
    matched = {p.id: matching(rule, p, tokenizer) for p in prompts}
    strings = sorted(set().union(*matched.values()))
    rng = np.random.default_rng(config.seed)
    seen = set(rng.permutation(strings)[: (len(strings) + 1) // 2].tolist()) if len(strings) > 1 else set(strings)
    negatives = [r for r in records if not matched[r.prompt]]
    shown = [r for r in records if matched[r.prompt] and matched[r.prompt] <= seen] + negatives[0::2]
    held = [r for r in records if matched[r.prompt] and not matched[r.prompt] & seen] + negatives[1::2]
    novel = any(matched[r.prompt] for r in held) and any(matched[r.prompt] for r in shown)
    if not novel:
        shown, held = records[0::2], records[1::2]
    half = (config.top_records // 2, config.random_records // 2, config.seed)
    return [r for side in exemplar_pool(shown, *half) for r in side], \
        [r for side in exemplar_pool(held, *half) for r in side], novel


def benchmark_roles(prompts: list[Prompt], tokenizer: Any, rule: PlantedRule) -> Roles:
    """The roles `adag describe` would find for these prompts (their targets from the output rule)."""
    targets = [rule.plant(p, tokenizer)[0] if rule.kind == "output" else [] for p in prompts]
    return prompt_roles(pd.DataFrame({
        "prompt": [p.id for p in prompts], "text": [p.row.prompt for p in prompts],
        "tokens": [p.tokens for p in prompts], "metadata": [json.dumps(p.row.metadata) for p in prompts],
        "labels": [p.row.labels for p in prompts], "target_tokens": targets}))


def baselines(kind: str, shown: list[Record]) -> tuple[str, str]:
    """Quote the top token, and the top 3 tokens, of the shown records (outputs: with the verb of the
    sign of their summed effect)."""
    totals: dict[str, float] = {}
    for record in shown:
        for token, value in zip(record.tokens, record.values):
            totals[token] = totals.get(token, 0.0) + float(value if kind == "output" else max(value, 0.0))
    ranked = sorted(totals, key=lambda t: -abs(totals[t]))

    def quoted(tokens: list[str]) -> str:
        if kind == "input":
            return ", ".join(name_of(t) for t in tokens)
        return "; ".join(f"{'promotes' if totals[t] > 0 else 'suppresses'} {name_of(t)}" for t in tokens)

    return quoted(ranked[:1]), quoted(ranked[:3])


@dataclass
class CaseResult:
    rule: str
    kind: str
    description: str
    score: float | None
    true_score: float | None
    wrong_score: float | None
    near_score: float | None = None
    top_token: float | None = None
    top3_tokens: float | None = None
    unseen: bool = False  # held-out rule-matching strings were never shown

    @property
    def recovered(self) -> bool:
        if self.score is None or self.true_score is None:
            return False
        best_baseline = max((b for b in (self.top_token, self.top3_tokens) if b is not None), default=-1.0)
        return self.score >= best_baseline + MARGIN and self.score >= self.true_score - RECOVERED_WITHIN

    @property
    def beats_baselines(self) -> bool:
        return self.score is not None and all(self.score > b for b in (self.top_token, self.top3_tokens)
                                              if b is not None)


def evaluate_rule(rule: PlantedRule, tokenizer: Any, explainer: Explainer, simulator: CachedBackend,
                  config: DescribeConfig) -> CaseResult:
    prompts = dataset_prompts(tokenizer, rule.datasets)
    records = planted_records(rule, prompts, tokenizer, config.seed)
    roles = benchmark_roles(prompts, tokenizer, rule)
    shown, held, unseen = unseen_split(rule, prompts, records, tokenizer, config)
    if rule.kind == "input":
        excerpts = input_excerpts(shown, config, roles)
        held_out = HeldOut([r.tokens for r in held], [r.values for r in held])
    else:
        texts = {p.id: "".join(p.tokens[shown_start(p.tokens, p.row.prompt):]) for p in prompts}
        excerpts, held_out = output_excerpts(shown, texts, roles), output_held_out(held, texts)
    try:
        best = best_description(explainer, simulator, rule.kind, excerpts, held_out, config, rule.name)
    except UnusableReply as error:  # every attempt unusable: no description, scored as none (the baselines still are)
        best = Scored(f"(no usable reply: {error})", None)
    top, top3 = baselines(rule.kind, shown)
    true_score, wrong_score, near_score, top_score, top3_score = (
        simulated_score(simulator, rule.kind, d, held_out, config.attempts)
        for d in (rule.truth, rule.wrong, rule.near, top, top3))
    return CaseResult(rule.name, rule.kind, best.description, best.score, true_score, wrong_score, near_score,
                      top_score, top3_score, unseen)
