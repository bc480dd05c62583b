"""Multi-view similarity of half-neurons (DESIGN.md section 7), as sparse matrix products."""

from __future__ import annotations

import numpy as np

from adag.cluster.config import Combine
from adag.cluster.profiles import HalfNeuronProfiles


def view_similarity(blocks, present) -> tuple[np.ndarray, np.ndarray]:
    """Mean per-prompt cosine over the prompts where both half-neurons have this view, and whether
    the view exists for the pair at all. `blocks` rows are unit-length per prompt block."""
    summed = (blocks @ blocks.T).toarray()
    count = (present @ present.T).toarray()
    mean = np.divide(summed, count, out=np.zeros_like(summed, dtype=np.float64), where=count > 0)
    return mean, count > 0


def combine_views(a: np.ndarray, b: np.ndarray, has_a: np.ndarray, has_b: np.ndarray,
                  how: Combine = "harmonic") -> np.ndarray:
    """Harmonic mean of the two views clamped at 0 (0 where both are 0), or their mean; where only
    one view exists, that view; where neither does (never co-occurring), 0. "input" and "output"
    use one view alone (for comparison)."""
    if how == "input":
        return np.where(has_a, a, 0.0)
    if how == "output":
        return np.where(has_b, b, 0.0)
    if how == "harmonic":
        a_pos, b_pos = np.clip(a, 0, None), np.clip(b, 0, None)
        total = a_pos + b_pos
        both = np.divide(2 * a_pos * b_pos, total, out=np.zeros_like(total), where=total > 0)
    elif how == "mean":
        both = (a + b) / 2
    else:
        raise ValueError(f"unknown combination {how!r}; use harmonic, mean, input or output")
    return np.where(has_a & has_b, both, np.where(has_a, a, np.where(has_b, b, 0.0)))


def similarity(profiles: HalfNeuronProfiles, how: Combine = "harmonic") -> np.ndarray:
    """The (H, H) similarity matrix S used for clustering."""
    a, has_a = view_similarity(profiles.inputs, profiles.has_input)
    b, has_b = view_similarity(profiles.outputs, profiles.has_output)
    return combine_views(a, b, has_a, has_b, how).astype(np.float32)
