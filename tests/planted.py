"""Synthetic trace tables with planted groups of half-neurons, for tests and benchmarks."""

from __future__ import annotations

import numpy as np
import pandas as pd


def planted_tables(
    groups: list[tuple[int, int]], per_group: int, n_prompts: int, k: int = 5, occurrence: float = 0.3,
    noise: float = 0.1, length: tuple[int, int] = (12, 24), seed: int = 0,
) -> tuple[pd.DataFrame, pd.DataFrame, np.ndarray]:
    """Nodes and prompts tables in the trace stage's layout, plus each half-neuron's true group.

    A group is (input pattern, output pattern): its half-neurons' raw input contributions come
    mostly from the token `input pattern` positions before the last one, and their raw output
    contributions push the target logits along the group's output pattern. The tables store
    shares, as the trace does (divided by the activation and by the target logit). Each
    half-neuron occurs in each prompt with probability `occurrence`, at one position.
    """
    rng = np.random.default_rng(seed)
    output_patterns = rng.normal(size=(max(o for _, o in groups) + 1, k))
    truth = np.repeat(np.arange(len(groups)), per_group)
    n_half = len(truth)
    lengths = rng.integers(length[0], length[1] + 1, size=n_prompts)
    target_logits = rng.uniform(5, 20, size=(n_prompts, k))

    per_prompt = rng.binomial(n_half, occurrence, size=n_prompts)
    half_of = np.concatenate([np.sort(rng.choice(n_half, c, replace=False)) for c in per_prompt])
    prompt_of = np.repeat(np.arange(n_prompts), per_prompt)
    n_nodes = len(prompt_of)
    activation = rng.uniform(0.5, 2.0, size=n_nodes)
    node_lengths = lengths[prompt_of]
    offsets = np.concatenate([[0], np.cumsum(node_lengths)])
    values = rng.standard_normal(offsets[-1], dtype=np.float32)  # float32 keeps a 10k-prompt table small
    values *= np.repeat((noise / np.sqrt(node_lengths)).astype(np.float32), node_lengths)
    input_offset = np.array([i for i, _ in groups])[truth[half_of]]
    values[offsets[:-1] + node_lengths - 1 - input_offset] += 1.0
    values /= np.repeat(activation.astype(np.float32), node_lengths)
    inputs = np.split(values, offsets[1:-1])

    out_pattern = np.array([o for _, o in groups])[truth[half_of]]
    outputs = output_patterns[out_pattern] + rng.normal(scale=noise, size=(n_nodes, k)) * np.abs(
        output_patterns[out_pattern]).mean(1, keepdims=True)
    outputs /= target_logits[prompt_of]

    nodes = pd.DataFrame({
        "prompt": prompt_of.astype(np.int32),
        "node": np.zeros(n_nodes, dtype=np.int32),
        "layer": (half_of % 4).astype(np.int16),
        "position": (node_lengths - 1).astype(np.int32),
        "neuron": half_of.astype(np.int32),
        "activation": activation.astype(np.float32),
        "attribution": rng.normal(size=n_nodes).astype(np.float32),
        "input_profile": inputs,
        "output_profile": list(outputs.astype(np.float32)),
    })
    nodes["node"] = nodes.groupby("prompt").cumcount().astype(np.int32)
    prompts = pd.DataFrame({"prompt": np.arange(n_prompts, dtype=np.int32), "n_tokens": lengths.astype(np.int32),
                            "target_logits": list(target_logits.astype(np.float32))})
    return nodes, prompts, truth
