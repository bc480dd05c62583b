"""What an intervention does to the model's answer: probabilities, logits, KL, top tokens, faithfulness."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import numpy as np
import pandas as pd
import torch

from adag.models import LoadedModel
from adag.trace.attribute import PromptBatch


def prompt_batches(lm: LoadedModel, prompts: pd.DataFrame, batch_size: int) -> list[tuple[pd.DataFrame, PromptBatch]]:
    """Left-padded batches of a run's traced prompts (token ids from the trace tables)."""
    out = []
    for start in range(0, len(prompts), batch_size):
        rows = prompts.iloc[start:start + batch_size]
        tokens = [list(map(int, t)) for t in rows["token_ids"]]
        out.append((rows, PromptBatch.left_pad(tokens, [[] for _ in tokens], lm.pad_id, lm.device)))
    return out


@torch.no_grad()
def last_logits(lm: LoadedModel, batch: PromptBatch,
                intervention: AbstractContextManager | None = None) -> torch.Tensor:
    with intervention or nullcontext():
        out = lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                       position_ids=batch.position_ids, logits_to_keep=1, use_cache=False)
    return out.logits[:, -1].float()


def effect(lm: LoadedModel, rows: pd.DataFrame, reference: torch.Tensor, steered: torch.Tensor,
           top: int = 5) -> pd.DataFrame:
    """Per prompt: probability of the original top target and of all targets, mean change of the
    target logits, KL(unsteered || steered) and the steered top tokens."""
    targets = torch.tensor(np.stack(rows["target_ids"].to_numpy()).astype(np.int64), device=steered.device)
    log_p = steered.log_softmax(-1)
    log_q = reference.log_softmax(-1)
    probs = log_p.exp().gather(-1, targets)
    kl = (log_q.exp() * (log_q - log_p)).sum(-1)
    top_ids = steered.topk(top, dim=-1).indices.tolist()
    return pd.DataFrame({
        "prompt": rows["prompt"].to_numpy(),
        "p_top": probs[:, 0].cpu().numpy(),
        "p_targets": probs.sum(-1).cpu().numpy(),
        "logit_change": (steered.gather(-1, targets) - reference.gather(-1, targets)).mean(-1).cpu().numpy(),
        "kl": kl.clamp_min(0).cpu().numpy(),
        "top_tokens": [[lm.tokenizer.decode([i]) for i in ids] for ids in top_ids],
    })


def metric_value(logits: torch.Tensor, rows: pd.DataFrame) -> np.ndarray:
    """The trace metric m = sum_i c_i logit_i for each prompt, from the run's targets."""
    ids = torch.tensor(np.stack(rows["target_ids"].to_numpy()).astype(np.int64), device=logits.device)
    coeffs = torch.tensor(np.stack(rows["target_coeffs"].to_numpy()), dtype=logits.dtype, device=logits.device)
    return (logits.gather(-1, ids) * coeffs).sum(-1).cpu().numpy()


def faithfulness_curve(fractions: list[float], value_of: Callable[[float | None, bool], float]) -> pd.DataFrame:
    """Faithfulness (F(C) - F(empty)) / (F(M) - F(empty)) of the circuit C made of the top fraction
    of nodes, and completeness, the same for its complement. `value_of(fraction, complement)` gives the
    summed metric with only C (or only M minus C) left; fraction None means the full model."""
    full, empty = value_of(None, False), value_of(0.0, False)
    span = full - empty
    rows = []
    for fraction in fractions:
        kept = value_of(fraction, False)
        rest = value_of(fraction, True)
        rows.append({"fraction": fraction, "faithfulness": (kept - empty) / span if span else np.nan,
                     "completeness": (rest - empty) / span if span else np.nan})
    return pd.DataFrame(rows)
