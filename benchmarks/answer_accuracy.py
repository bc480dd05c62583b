"""How often each built-in model answers the built-in datasets right: print the table in
docs/models.md.

    python benchmarks/answer_accuracy.py                                  # both built-in models
    python benchmarks/answer_accuracy.py --models gemma3-270m --datasets country-capitals

A row counts as answered when the model's top next token, after the prompt formatted as `adag trace`
formats it (chat template or plain text), is the first token of " " + its metadata `answer`
(" New" for New Delhi). Also printed: the mean probability of that token.
"""

from __future__ import annotations

import argparse

import torch

from adag.datasets import encode_prompt, load_dataset, uses_chat_template
from adag.models import BUILTIN_MODELS, load_model
from adag.trace import PromptBatch

ANSWERED = ("country-capitals", "state-capitals", "addition", "antonyms")


@torch.no_grad()
def accuracy(lm, dataset: str, batch_size: int = 16) -> tuple[float, float, int]:
    """Share of rows whose top next token is the answer's first token, and its mean probability."""
    rows = load_dataset(dataset).rows
    hits, probability = 0, 0.0
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        batch = PromptBatch.left_pad([encode_prompt(lm.tokenizer, row) for row in chunk], [[]] * len(chunk),
                                     lm.pad_id, lm.device)
        logits = lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                          position_ids=batch.position_ids, logits_to_keep=1).logits[:, -1].float()
        answers = torch.tensor([lm.tokenizer(" " + str(row.metadata["answer"]), add_special_tokens=False)
                                ["input_ids"][0] for row in chunk], device=logits.device)
        hits += int((logits.argmax(-1) == answers).sum())
        probability += float(logits.softmax(-1).gather(-1, answers[:, None]).sum())
    return hits / len(rows), probability / len(rows), len(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(BUILTIN_MODELS))
    parser.add_argument("--datasets", default=",".join(ANSWERED))
    args = parser.parse_args()
    print(f"{'model':14s} {'format':6s} {'dataset':18s} {'rows':>5s} {'top-1':>7s} {'p(answer)':>10s}")
    for name in args.models.split(","):
        lm = load_model(name)
        prompt_format = "chat" if uses_chat_template(lm.tokenizer) else "plain"
        for dataset in args.datasets.split(","):
            top1, probability, rows = accuracy(lm, dataset)
            print(f"{name:14s} {prompt_format:6s} {dataset:18s} {rows:5d} {top1:7.0%} {probability:10.2f}")


if __name__ == "__main__":
    main()
