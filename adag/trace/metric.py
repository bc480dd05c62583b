"""The metric m(x) = sum_i c_i * logit_i over target tokens at the last position."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from adag.errors import AdagError
from adag.trace.rules import linear_through_origin

MetricName = Literal["topk", "labels", "logit_diff"]


@dataclass
class Targets:
    """Per prompt: target token ids (B, k) and their coefficients in the metric (B, k)."""

    ids: torch.Tensor
    coeffs: torch.Tensor


def choose_targets(metric: MetricName, k: int, last_logits: torch.Tensor, labels: list[list[int]]) -> Targets:
    """topk: the model's own top-k next tokens; labels: the given label tokens, summed;
    logit_diff: first label minus second label (the counterfactual)."""
    if metric == "topk":
        ids = last_logits.detach().topk(k, dim=-1).indices
        return Targets(ids, torch.ones(ids.shape, dtype=torch.float32, device=ids.device))
    counts = {len(row) for row in labels}
    if metric == "labels":
        if len(counts) != 1 or 0 in counts:
            raise AdagError("metric 'labels' needs the same number (at least one) of labels on every row")
        ids = torch.tensor(labels, device=last_logits.device)
        return Targets(ids, torch.ones(ids.shape, dtype=torch.float32, device=ids.device))
    if metric == "logit_diff":
        if counts != {2}:
            raise AdagError("metric 'logit_diff' needs exactly two labels per row: the answer and a counterfactual")
        ids = torch.tensor(labels, device=last_logits.device)
        coeffs = torch.tensor([[1.0, -1.0]] * len(labels), device=ids.device)
        return Targets(ids, coeffs)
    raise AdagError(f"unknown metric '{metric}'; use topk, labels or logit_diff")


def target_logits(
    last_logits: torch.Tensor, unembedded: torch.Tensor | None, softcap: float | None, targets: Targets
) -> torch.Tensor:
    """The target logits (B, k), with soft-capping linearised like any other activation function."""
    if softcap:
        last_logits = linear_through_origin(unembedded[:, -1], last_logits)
    return at_least_float32(last_logits.gather(-1, targets.ids))


def at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """Results are kept in float32 (bf16/fp16 models) or in the model's own wider dtype (float64 tests)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))
