"""Generation under steering, judged yes/no by an LLM (any describe-stage backend): the judge stage."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import pandas as pd
import torch

from adag.describe.llm import CachedBackend, make_backend
from adag.models import LoadedModel
from adag.models.loading import cache_dir
from adag.pipeline import writing
from adag.steer.config import JUDGE_STAGE, JudgeConfig
from adag.steer.evaluate import prompt_batches
from adag.steer.intervene import scaled
from adag.store import RunDir

STAGE = JUDGE_STAGE.name
JUDGE = "Question: {question}\n\nText:\n{text}\n\nAnswer with yes or no only."
COHERENCE = "Is this text coherent?"


@torch.no_grad()
def generate(lm: LoadedModel, prompts, samples: int, max_new_tokens: int, seed: int,
             intervention: AbstractContextManager | None = None, batch_size: int = 8) -> list[tuple[int, str]]:
    """`samples` sampled continuations of every prompt, as (prompt, text) pairs. Each batch samples
    from its own seed, so the result does not depend on what ran before. The intervention (entered
    once) holds for every batch."""
    out = []
    with intervention or nullcontext():
        for rows, batch in prompt_batches(lm, prompts, batch_size):
            with lm.seeded(seed):
                sequences = lm.model.generate(
                    input_ids=batch.input_ids, attention_mask=batch.attention_mask, do_sample=True, temperature=1.0,
                    top_k=None, top_p=None, max_new_tokens=max_new_tokens, num_return_sequences=samples,
                    pad_token_id=lm.pad_id)
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


def judge_run(run_dir: str | Path | RunDir, config: JudgeConfig, model: str | None = None,
              lm: LoadedModel | None = None) -> pd.DataFrame:
    """Steer one cluster at each multiplier, generate, and ask the judge; one row per multiplier and
    question, written to RUN/judge/rates.parquet."""
    from adag.steer.run import run_model

    with writing(run_dir, JUDGE_STAGE, config) as (view, out):
        view.check_clusters([config.cluster])
        judge = CachedBackend(make_backend(config.judge), cache_dir() / "llm-cache.sqlite")
        lm = lm or run_model(view.run, model)
        members = view.cluster_members[config.cluster]
        questions = [config.question] + ([COHERENCE] if config.coherence else [])
        rows = []
        for multiplier in config.multipliers:
            texts = [text for _, text in generate(lm, view.prompts, config.samples, config.max_new_tokens,
                                                  config.seed, scaled(lm.model, lm.adapter, members, multiplier))]
            rows += [{"cluster": config.cluster, "multiplier": multiplier, "question": asked,
                      **judge_rate(judge, asked, texts)} for asked in questions]
        table = pd.DataFrame(rows)
        out.write_table("rates", table)
    return table


def judge_summary(table: pd.DataFrame, run_dir: str) -> str:
    return table.round(3).to_string(index=False)
