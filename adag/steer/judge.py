"""Generation under steering, judged yes/no by an LLM (the judge role, adag.llm.roles): the judge stage."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import pandas as pd
import torch

from adag.errors import AdagError
from adag.llm import CachedBackend, make_backend
from adag.models import LoadedModel, run_model
from adag.pipeline import StageResult, Summary, writing
from adag.steer.config import JUDGE_STAGE, JudgeConfig
from adag.steer.evaluate import prompt_batches
from adag.steer.intervene import scaled
from adag.store import DamagedFile, RunDir
from adag.subsets import kept_clusters
from adag.view import RunView

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
              lm: LoadedModel | None = None) -> StageResult:
    """Steer one cluster at each multiplier, generate, and ask the judge; one row per multiplier and
    question, written to RUN/judge/rates.parquet. The rows of other clusters judged with the same
    settings are kept (adag.subsets). A judge that answers neither yes nor no to anything is an error."""
    with writing(run_dir, JUDGE_STAGE, config) as (view, out):
        finished = _finished_rates(view)
        held = set() if finished is None else {int(c) for c in finished["cluster"]}
        kept = kept_clusters(view.run, JUDGE_STAGE, config, config, {"cluster"}, {config.cluster}, held,
                             "judge into a copy of the run directory")
        view.check_clusters([config.cluster])
        if config.cluster in kept and view.run.entry(STAGE)["config"] == config.model_dump(mode="json"):
            out.cancel()  # judged already with these settings: nothing changes
            return StageResult(view.run, table=finished)
        if config.cluster in kept:
            rows = finished[finished["cluster"] == config.cluster]
        else:
            rows = _judged(view, config, lm or run_model(view.model, model))
        others = finished[finished["cluster"] != config.cluster] if kept else None
        table = rows if others is None else pd.concat([others, rows], ignore_index=True).sort_values(
            "cluster", kind="stable", ignore_index=True)
        out.write_table("rates", table)
        out.facts.update(clusters=sorted(int(c) for c in table["cluster"].unique()),
                         failed=int(table["rate"].isna().sum()))
    return StageResult(view.run, table=table)


def _judged(view: RunView, config: JudgeConfig, lm: LoadedModel) -> pd.DataFrame:
    judge = CachedBackend(make_backend(config.judge, "judge"))
    members = view.cluster_members[config.cluster]
    questions = [config.question] + ([COHERENCE] if config.coherence else [])
    rows = []
    for multiplier in config.multipliers:
        texts = [text for _, text in generate(lm, view.prompts, config.samples, config.max_new_tokens,
                                              config.seed, scaled(lm.model, lm.adapter, members, multiplier))]
        rows += [{"cluster": config.cluster, "multiplier": multiplier, "question": asked,
                  **judge_rate(judge, asked, texts)} for asked in questions]
    table = pd.DataFrame(rows)
    if table["rate"].isna().all():
        raise AdagError(f"the judge {config.judge} answered neither yes nor no about any of the "
                        f"{int(table['unclear'].sum())} generations, so no rate is defined; use another --judge "
                        "or a question it answers with yes or no")
    return table


def _finished_rates(view: RunView) -> pd.DataFrame | None:
    try:
        return view.table(STAGE, "rates")
    except DamagedFile:
        return None  # judged again


def judge_summary(result: StageResult) -> Summary:
    table = result.table
    text = table.round(3).to_string(index=False)
    failed = int(table["rate"].isna().sum())
    if not failed:
        return Summary(text)
    return Summary(text + f"\n{failed} of {len(table)} settings failed: the judge answered neither yes nor no "
                   "about any of their generations (rate undefined)", 1)
