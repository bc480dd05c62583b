"""Generation under steering, judged yes/no by an LLM (any describe-stage backend)."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch

from adag.describe.llm import CachedBackend
from adag.models import LoadedModel
from adag.steer.evaluate import prompt_batches

JUDGE = "Question: {question}\n\nText:\n{text}\n\nAnswer with yes or no only."


@torch.no_grad()
def generate(lm: LoadedModel, prompts, samples: int, max_new_tokens: int, seed: int,
             intervention: AbstractContextManager | None = None) -> list[tuple[int, str]]:
    """`samples` sampled continuations of every prompt, as (prompt, text) pairs."""
    out = []
    for rows, batch in prompt_batches(lm, prompts, batch_size=8):
        torch.manual_seed(seed)
        with intervention or nullcontext():
            sequences = lm.model.generate(
                input_ids=batch.input_ids, attention_mask=batch.attention_mask, do_sample=True, temperature=1.0,
                top_k=None, top_p=None, max_new_tokens=max_new_tokens, num_return_sequences=samples,
                pad_token_id=lm.tokenizer.pad_token_id)
        texts = lm.tokenizer.batch_decode(sequences[:, batch.input_ids.shape[1]:], skip_special_tokens=True)
        prompt_ids = [int(p) for p in rows["prompt"] for _ in range(samples)]
        out += list(zip(prompt_ids, texts))
    return out


def judge_rate(judge: CachedBackend, question: str, texts: list[str]) -> dict:
    """Ask the judge `question` about each text; rate = yes / (yes + no). Unclear answers count in neither."""
    yes = no = 0
    for text in texts:
        answer = judge.complete([{"role": "user", "content": JUDGE.format(question=question, text=text)}],
                                "judge", temperature=0.0, max_tokens=3).text.strip().lower()
        yes += answer.startswith("yes")
        no += answer.startswith("no")
    return {"yes": yes, "no": no, "unclear": len(texts) - yes - no,
            "rate": yes / (yes + no) if yes + no else float("nan")}
