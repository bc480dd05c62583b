"""Check which capitals the built-in model knows unmisled, and choose the `misleading-capitals` study.

    python scripts/misleading_check.py      # rewrites adag/datasets/misleading_capitals.json

A maintenance script, not part of the package: it loads the built-in model.

For each candidate country the model reads the chat-templated question followed by the seed response
"Answer:"; the country passes when its capital's first token is the model's top next token. The study
takes the passing countries with the highest probability of that token whose answers have distinctive
first tokens (at least two letters: " H" for Hanoi says little; not the country's own first token, as
" Mexico" for Mexico City, which the model may say to begin a sentence about Mexico), and gives each three wrong answers
whose first tokens differ from the capital's: a large city of the country, another study country's
capital and an invented name.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

import adag.datasets
from adag.datasets import PromptRow, encode_prompt
from adag.datasets.builtin import CAPITAL_QUESTION, SEED
from adag.datasets.misleading import CAPITALS, CHECK_FILE, LARGE_CITIES, MADE_UP_CITIES, WRONG_KINDS
from adag.models import LoadedModel, load_model

MODEL = "smollm2-135m"
STUDY_SIZE = 30
MIN_TOKEN_LETTERS = 2


def first_token(tokenizer, name: str) -> str:
    """The first token of a name as the model would write it after "Answer:" (with a leading space)."""
    return tokenizer.decode(tokenizer(" " + name, add_special_tokens=False)["input_ids"][:1])


def check_country(lm: LoadedModel, country: str, capital: str) -> dict:
    ids = encode_prompt(lm.tokenizer, PromptRow(prompt=CAPITAL_QUESTION.format(country=country), seed_response=SEED))
    with torch.inference_mode():
        probs = lm.model(torch.tensor([ids], device=lm.device)).logits[0, -1].double().softmax(-1)
    capital_id = lm.tokenizer(" " + capital, add_special_tokens=False)["input_ids"][0]
    top = int(probs.argmax())
    return {"country": country, "capital": capital, "capital_token": first_token(lm.tokenizer, capital),
            "p_capital": round(float(probs[capital_id]), 4), "top_token": lm.tokenizer.decode([top]),
            "p_top": round(float(probs[top]), 4), "passed": top == capital_id}


def choose_study(results: list[dict], tokenizer) -> list[dict]:
    def distinctive(name: str) -> bool:
        return len(first_token(tokenizer, name).strip()) >= MIN_TOKEN_LETTERS

    def usable(check: dict) -> bool:
        capital, country = check["capital"], check["country"].removeprefix("the ")
        return (check["passed"] and distinctive(capital) and distinctive(LARGE_CITIES[check["country"]])
                and first_token(tokenizer, capital) != first_token(tokenizer, country))

    passed = [check for check in results if usable(check)]
    chosen = sorted(passed, key=lambda r: -r["p_capital"])[:STUDY_SIZE]
    if len(chosen) < STUDY_SIZE:
        raise SystemExit(f"only {len(chosen)} countries passed; add candidates to adag/datasets/misleading.py")
    capitals = [entry["capital"] for entry in chosen]
    invented = [name for name in MADE_UP_CITIES if distinctive(name)]
    study = []
    for index, entry in enumerate(chosen):
        correct = first_token(tokenizer, entry["capital"])

        def first_unlike(names: list[str], start: int, correct: str = correct) -> str:
            """The first name from `start` on (wrapping round) that does not start like the capital."""
            start %= len(names)
            return next(n for n in names[start:] + names[:start] if first_token(tokenizer, n) != correct)

        city = LARGE_CITIES[entry["country"]]
        if first_token(tokenizer, city) == correct:
            raise SystemExit(f"{entry['country']}: {city} starts like {entry['capital']}; pick another city")
        study.append({"country": entry["country"], "capital": entry["capital"], "p_capital": entry["p_capital"],
                      "same_country_city": city,
                      "other_capital": first_unlike(capitals, index + len(chosen) // 2),
                      "made_up": first_unlike(invented, index)})
    return study


def main() -> None:
    lm = load_model(MODEL)
    results = [check_country(lm, country, capital) for country, capital in CAPITALS.items()]
    for check in results:
        print(f"{check['country']:26s} {check['capital']:14s} p={check['p_capital']:.4f} "
              f"top={check['top_token']!r} {'passed' if check['passed'] else ''}")
    study = choose_study(results, lm.tokenizer)
    names = sorted({entry[key] for entry in study for key in ("capital", *WRONG_KINDS)})
    record = {
        "model": MODEL, "weights": lm.weights_hash, "question": CAPITAL_QUESTION, "seed_response": SEED,
        "rule": "passed: the capital's first token is the top next token after the chat template and the seed",
        "candidates": len(results), "passed": sum(r["passed"] for r in results),
        "study": study,
        "first_tokens": {name: first_token(lm.tokenizer, name) for name in names},
        "checks": results,
    }
    path = Path(adag.datasets.__file__).with_name(CHECK_FILE)
    path.write_text(json.dumps(record, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"{record['passed']} of {len(results)} countries passed; the study's {len(study)} written to {path}")


if __name__ == "__main__":
    main()
