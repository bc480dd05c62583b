"""The measure stage: one behaviour value per prompt, the quantity a study correlates clusters with and
steers. p_correct is the probability of the row's first label (the correct answer) at the last
position; logit_diff the first label's logit minus the second's (the misleading answer); judge the
yes-rate of a judge LLM over sampled generations (the paper's attack success rate). Steering measures
p_top, the probability of the model's own top answer, where a run has no measure."""

from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from adag.datasets import PromptRow, label_token_ids
from adag.errors import AdagError
from adag.half_neurons import HalfNeuron
from adag.llm import CachedBackend, make_backend
from adag.models import LoadedModel, run_model
from adag.pipeline import StageResult, Summary, number, writing
from adag.steer.config import MEASURE_STAGE, MeasureConfig
from adag.steer.evaluate import last_logits, prompt_batches
from adag.steer.intervene import scaled
from adag.steer.judge import generate, judge_rate
from adag.store import RunDir

STAGE = MEASURE_STAGE.name
LABELS_NEEDED = {"p_correct": 1, "logit_diff": 2}


class Measure:
    """The measure of `config` on a run's prompts, with or without an intervention.

    p_correct, logit_diff and p_top are read off last-position logits (`of_logits`); judge needs
    generations (`judged`). `values` computes either kind.
    """

    def __init__(self, lm: LoadedModel, prompts: pd.DataFrame, config: MeasureConfig):
        self.lm, self.prompts, self.config = lm, prompts, config
        self.uses_logits = config.measure != "judge"
        self.judge: CachedBackend | None = None
        self.label_ids: dict[int, np.ndarray] = {}  # the tokens whose logits the measure reads, per prompt
        if config.measure == "judge":
            self.judge = CachedBackend(make_backend(config.judge, "judge"))
        elif config.measure == "p_top":
            self.label_ids = {int(p): np.asarray(t[:1], dtype=np.int64)
                              for p, t in zip(prompts["prompt"], prompts["target_ids"])}
        else:
            self.label_ids = _label_ids(lm, prompts, LABELS_NEEDED[config.measure])

    def of_logits(self, logits: torch.Tensor, rows: pd.DataFrame) -> np.ndarray:
        """The measure of each row from its last-position logits (B, V)."""
        ids = torch.as_tensor(np.stack([self.label_ids[int(p)] for p in rows["prompt"]]), device=logits.device)
        logits = logits.double()
        if self.config.measure in ("p_correct", "p_top"):
            return logits.softmax(-1).gather(-1, ids[:, :1])[:, 0].cpu().numpy()
        return (logits.gather(-1, ids[:, :1]) - logits.gather(-1, ids[:, 1:2]))[:, 0].cpu().numpy()

    def judged(self, intervention: AbstractContextManager | None = None) -> pd.DataFrame:
        """Per prompt: the judge's yes, no and unclear counts over `samples` generations, and the
        rate yes / (yes + no) as `value`."""
        texts = generate(self.lm, self.prompts, self.config.samples, self.config.max_new_tokens, self.config.seed,
                         intervention, self.config.batch_size)
        by_prompt: dict[int, list[str]] = {}
        for prompt, text in texts:
            by_prompt.setdefault(prompt, []).append(text)
        rows = []
        for prompt, answers in by_prompt.items():
            rate = judge_rate(self.judge, self.config.question, answers)
            rows.append({"prompt": prompt, "value": rate.pop("rate"), **rate})
        return pd.DataFrame(rows)

    def values(self, batches: list, half_neurons: list[HalfNeuron] | None = None, multiplier: float = 1.0,
               positions: list[torch.Tensor] | None = None) -> pd.DataFrame:
        """`prompt` and `value` for every prompt of `batches` (from `prompt_batches`), with
        `half_neurons` scaled by `multiplier`, at all positions or at `positions` (one (B, T) mask
        per batch). Multiplier 1 leaves the model as it is, so nothing is steered."""
        steered = bool(half_neurons) and multiplier != 1.0
        if not self.uses_logits:
            if steered and positions is not None:
                raise AdagError("a judge measure steers generations, which have no traced positions; "
                                "use --positions all")
            return self.judged(scaled(self.lm.model, self.lm.adapter, half_neurons, multiplier) if steered else None)
        frames = []
        for index, (rows, batch) in enumerate(batches):
            where = positions[index] if positions is not None else None
            intervention = scaled(self.lm.model, self.lm.adapter, half_neurons, multiplier, where) if steered else None
            logits = last_logits(self.lm, batch, intervention)
            frames.append(pd.DataFrame({"prompt": rows["prompt"].to_numpy(), "value": self.of_logits(logits, rows)}))
        return pd.concat(frames, ignore_index=True)


def _label_ids(lm: LoadedModel, prompts: pd.DataFrame, needed: int) -> dict[int, np.ndarray]:
    """The first `needed` label token ids of every prompt."""
    if "labels" not in prompts.columns:
        raise AdagError("this run's trace does not record the rows' labels (traced by an older adag); "
                        "trace it again into a new --out directory")
    out = {}
    for prompt, text, labels in zip(prompts["prompt"], prompts["text"], prompts["labels"]):
        labels = [str(label) for label in labels]
        if len(labels) < needed:
            raise AdagError(f"prompt {int(prompt)} has {len(labels)} label(s); this measure needs {needed} "
                            "(the correct answer first, then the misleading one); give every row its labels "
                            "or use --measure judge")
        out[int(prompt)] = np.asarray(label_token_ids(lm.tokenizer, PromptRow(prompt=text, labels=labels[:needed]),
                                                      int(prompt)), dtype=np.int64)
    return out


def measure_run(run_dir: str | Path | RunDir, config: MeasureConfig, model: str | None = None,
                lm: LoadedModel | None = None) -> StageResult:
    """Measure every traced prompt; written to RUN/measure/values.parquet (prompt, value, and for the
    judge its yes/no/unclear counts)."""
    with writing(run_dir, MEASURE_STAGE, config) as (view, out):
        lm = lm or run_model(view.model, model)
        batches = prompt_batches(lm, view.prompts, config.batch_size)
        table = Measure(lm, view.prompts, config).values(batches).sort_values("prompt", ignore_index=True)
        failed = ~np.isfinite(table["value"].to_numpy(dtype=float))
        if failed.all():
            raise AdagError(f"no prompt has a {config.measure} value: " + (
                f"the judge {config.judge} answered neither yes nor no about any generation; use another --judge or "
                "a question it answers with yes or no" if config.measure == "judge" else
                "the model's logits are not finite"))
        out.write_table("values", table)
        out.facts.update(measure=config.measure, mean=float(table["value"].mean()), failed=int(failed.sum()))
    return StageResult(view.run, table=table)


def measure_summary(result: StageResult) -> Summary:
    """The values' range; prompts without a value (a judge that answered neither yes nor no about any of
    their generations) are failures: counted, and the exit status is 1."""
    table = result.table
    value = table["value"]
    text = (f"measured {len(table)} prompts: mean {number(value.mean())}, min {number(value.min())}, "
            f"max {number(value.max())} -> {result.run.path / 'measure' / 'values.parquet'}")
    failed = int(value.isna().sum())
    if not failed:
        return Summary(text)
    return Summary(f"{text}\n{failed} of {len(table)} prompts failed: no value (the judge answered neither yes nor "
                   "no)", 1)
