"""Exemplar records for the explainer and simulator, and how they are highlighted (DESIGN.md section 8)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from adag.view import prompt_input_vectors

if TYPE_CHECKING:
    from adag.view import RunView

QUANTILES = (0.999, 0.995, 0.99, 0.98, 0.95, 0.9, 0.85, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0)


@dataclass
class Record:
    """One prompt's tokens with a value per token (input records) or per target (output records)."""

    prompt: int
    tokens: list[str]
    values: np.ndarray
    start: int = 0  # input records: the prompt position of the first token (only the shown part is kept)


def shown_start(tokens: list[str], text: str) -> int:
    """The first token of the part of a prompt that matters: the user's text, then the template's turn
    change and the seed response up to the end (a chat template's system prompt, repeated in every
    prompt, is left out). 0 when the text is not found among the tokens."""
    joined = "".join(tokens)
    at = joined.rfind(text.strip()) if text.strip() else -1
    if at < 0:
        return 0
    ends = np.cumsum([len(t) for t in tokens])
    return int(np.searchsorted(ends, at, side="right"))


def shown_text(prompts: pd.DataFrame) -> dict[int, str]:
    """Each prompt's shown part as text: the user's turn and the seed response (e.g. "...?  Answer:")."""
    return {int(p): "".join(tokens[shown_start(list(tokens), text):])
            for p, tokens, text in zip(prompts["prompt"], prompts["tokens"], prompts["text"])}


def raw_inputs(nodes: pd.DataFrame) -> list[np.ndarray]:
    """Each node's raw input contribution per position: its share of the activation times the activation
    (as clustering uses them), so that a near-silent neuron with a huge share counts for little."""
    activation = nodes["activation"].to_numpy().astype(np.float64)
    return [np.asarray(p, dtype=np.float64) * a for p, a in zip(nodes["input_profile"].to_numpy(), activation)]


def raw_outputs(nodes: pd.DataFrame, prompts: pd.DataFrame) -> np.ndarray:
    """Each node's direct effect on each target logit in logit units (a_n * dlogit/da_n): the stored share
    of the target's logit times that logit, so that a low-logit candidate is not inflated."""
    logits = prompts.set_index("prompt")["target_logits"]
    scale = np.stack(logits.loc[nodes["prompt"].to_numpy()].to_numpy()).astype(np.float64)
    return np.stack(nodes["output_profile"].to_numpy()).astype(np.float64) * scale


def input_records(nodes: pd.DataFrame, prompts: pd.DataFrame, node_cluster: np.ndarray,
                  keep_first: bool = False) -> dict[int, list[Record]]:
    """Per cluster, one record per prompt it occurs in: the members' raw input contributions summed per
    token (`adag.view.prompt_input_vectors`: position 0 counts only with the trace's `keep_first`), over
    the shown part of the prompt (`shown_start`)."""
    indexed = prompts.set_index("prompt")
    records: dict[int, list[Record]] = {}
    for (cluster, prompt), values in sorted(prompt_input_vectors(nodes, node_cluster, keep_first).items()):
        tokens = list(indexed.at[prompt, "tokens"])
        start = shown_start(tokens, indexed.at[prompt, "text"])
        records.setdefault(cluster, []).append(Record(prompt, tokens[start:], values[start:], start))
    return records


def load_cluster_records(view: RunView) -> tuple[dict[int, list[Record]], dict[int, list[Record]]]:
    """Every cluster's input records and output records, from a clustered run."""
    keep_first = view.config("trace")["keep_first_position"]
    return (input_records(view.nodes, view.prompts, view.node_cluster, keep_first),
            output_records(view.nodes, view.prompts, view.node_cluster))


def output_records(nodes: pd.DataFrame, prompts: pd.DataFrame, node_cluster: np.ndarray) -> dict[int, list[Record]]:
    """Per cluster, one record per prompt: the members' direct effects on each target logit, in logits."""
    frame = pd.DataFrame({"cluster": node_cluster, "prompt": nodes["prompt"].to_numpy()})
    effects = raw_outputs(nodes, prompts)
    targets = prompts.set_index("prompt")["target_tokens"]
    records: dict[int, list[Record]] = {}
    for (cluster, prompt), index in frame.groupby(["cluster", "prompt"], sort=True).indices.items():
        records.setdefault(int(cluster), []).append(
            Record(int(prompt), list(targets[prompt]), effects[index].sum(0)))
    return records


def sign_part(records: list[Record], sign: int) -> list[Record]:
    """The positive (sign=1) or negative (sign=-1) part of each record, as non-negative values."""
    return [Record(r.prompt, r.tokens, np.clip(sign * r.values, 0, None), r.start) for r in records]


def exemplar_pool(records: list[Record], top: int = 80, random: int = 20, seed: int = 0) -> tuple[list, list]:
    """Top records by max value plus random others as negatives, split into the explainer's records
    and held-out records for scoring (alternating, so both get strong and weak examples)."""
    order = sorted(range(len(records)), key=lambda i: (-float(records[i].values.max(initial=0)), records[i].prompt))
    strongest, rest = order[:top], order[top:]
    rng = np.random.default_rng(seed)
    negatives = rng.permutation(rest)[:random].tolist() if rest else []
    explain = [records[i] for i in strongest[0::2] + negatives[0::2]]
    held_out = [records[i] for i in strongest[1::2] + negatives[1::2]]
    return explain, held_out


def quantile_walk_threshold(records: list[Record], k: int = 1) -> float:
    """Walk quantiles of the records' non-zero values from the most extreme down; stop at the first
    threshold that highlights at least k distinct token strings. Give it the explainer's records only:
    held-out values must not decide what the explainer sees."""
    values = np.concatenate([r.values for r in records]) if records else np.zeros(0)
    nonzero = values[values > 0]
    if not len(nonzero):
        return float("inf")
    threshold = float(nonzero.max())
    for q in QUANTILES:
        threshold = float(np.quantile(nonzero, q))
        distinct = {t.strip() for r in records for t, v in zip(r.tokens, r.values) if v >= threshold and v > 0}
        if len(distinct) >= k:
            break
    return threshold


def quantile_masks(records: list[Record], k: int) -> list[np.ndarray]:
    """Quantile-walk highlights, plus each record's own top token, so that no shown excerpt is bare."""
    threshold = quantile_walk_threshold(records, k)
    return [((r.values >= threshold) & (r.values > 0)) | top_k_mask(r, 1) for r in records]


def top_k_mask(record: Record, k: int) -> np.ndarray:
    """The top-k alternative: highlight each record's k largest non-zero values."""
    mask = np.zeros(len(record.values), dtype=bool)
    order = np.argsort(-record.values, kind="stable")[:k]
    mask[order] = record.values[order] > 0
    return mask


def highlight(tokens: list[str], mask: np.ndarray) -> str:
    """Join tokens, wrapping each run of consecutive highlighted tokens in {{ }} (leading spaces outside)."""
    out, open_run = [], False
    for token, marked in zip(tokens, mask):
        if marked and not open_run:
            stripped = token.lstrip()
            out.append(token[:len(token) - len(stripped)] + "{{" + stripped)
            open_run = True
        elif not marked and open_run:
            out[-1] += "}}"
            out.append(token)
            open_run = False
        else:
            out.append(token)
    if open_run:
        out[-1] += "}}"
    return "".join(out)


def normalised_scores(records: list[Record]) -> list[np.ndarray]:
    """Output contributions as integers in [-10, 10], scaled by the largest |value| among the records."""
    scale = max((float(np.abs(r.values).max(initial=0)) for r in records), default=0.0)
    if scale == 0:
        return [np.zeros(len(r.values), dtype=int) for r in records]
    return [np.rint(10 * r.values / scale).astype(int) for r in records]
