"""Nodes per prompt by node pooling, for growing datasets: print the table in docs/scaling.md.

    python benchmarks/aggregation_bench.py                      # built-in model, 8, 64 and 512 prompts
    python benchmarks/aggregation_bench.py --sizes 8,64 --device cuda

The prompts are the built-in `addition` template ('What is x + y?') with as many random pairs as the
largest size needs; each size takes the first n. Only the node pass runs (the profiles and edges
cost grows with the nodes counted here). For each size the prompts are planned as `adag trace` plans
them (sorted by length) in batches of the largest pooling batch; smaller pooling batches are
consecutive slices of those batches, which is how `adag trace` would batch them with that batch size.
Columns: `none` selects per prompt; `batch B` pools over each batch of B prompts (the default); and
`dataset` pools over all n prompts (`--aggregate-over dataset`).
"""

from __future__ import annotations

import argparse
import time

import torch

from adag.datasets import PromptRow, encode_prompt
from adag.datasets.builtin import addition
from adag.models import load_model
from adag.trace import PromptBatch, TraceConfig, node_scores
from adag.trace.nodes import nodes_from_keys, pool_from_end, select_batch_nodes, select_keys
from adag.trace.run import batch_plan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="8,64,512", help="comma-separated dataset sizes")
    parser.add_argument("--pooling-batches", default="2,4,8", help="comma-separated batch sizes to pool over")
    parser.add_argument("--threshold", type=float, default=0.005)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    sizes = [int(size) for size in args.sizes.split(",")]
    pooling = [int(size) for size in args.pooling_batches.split(",")]
    lm = load_model(args.model, device=args.device)
    rows = [PromptRow(**row) for row in addition(n=max(sizes))]
    tokens = [encode_prompt(lm.tokenizer, row) for row in rows]
    config = TraceConfig(threshold=args.threshold)
    print(f"model {args.model} ({args.device}), `addition` prompts of {min(map(len, tokens))}-{max(map(len, tokens))} "
          f"tokens, threshold {args.threshold}; mean nodes per prompt")
    print(f"{'prompts':>7}  {'none':>6}  " + "  ".join(f"{f'batch {size}':>8}" for size in pooling) +
          f"  {'dataset':>8}  {'seconds':>7}")
    for size in sizes:
        started = time.perf_counter()
        counts = _count_nodes(lm, config, tokens[:size], pooling)
        print(f"{size:>7}  {counts['none'] / size:>6.0f}  " +
              "  ".join(f"{counts[f'batch {b}'] / size:>8.0f}" for b in pooling) +
              f"  {counts['dataset'] / size:>8.0f}  {time.perf_counter() - started:>7.0f}", flush=True)


def _count_nodes(lm, config: TraceConfig, tokens: list[list[int]], pooling: list[int]) -> dict[str, int]:
    """Nodes kept in all prompts together, by pooling."""
    counts = dict.fromkeys(["none", "dataset", *(f"batch {b}" for b in pooling)], 0)
    none = config.model_copy(update={"aggregation": "none"})
    batches = []
    pooled = torch.zeros(lm.n_layers, max(map(len, tokens)), lm.n_neurons)
    for prompt_ids in batch_plan(tokens, max(pooling)):
        batch = _left_pad(lm, tokens, prompt_ids)
        scores, _ = node_scores(lm, config, batch)
        counts["none"] += len(select_batch_nodes(scores, batch, none))
        for size in pooling:
            for start in range(0, len(prompt_ids), size):
                sub_ids = prompt_ids[start:start + size]
                sub_batch = _left_pad(lm, tokens, sub_ids)
                width = sub_batch.input_ids.shape[1]
                counts[f"batch {size}"] += len(select_batch_nodes(scores[start:start + size, :, -width:], sub_batch,
                                                                  config))
        batch_pooled = pool_from_end(scores, config, len(tokens)).float().cpu()
        pooled[:, :batch_pooled.shape[1]] = torch.maximum(pooled[:, :batch_pooled.shape[1]], batch_pooled)
        batches.append(batch)
    keys = select_keys(pooled, config)
    counts["dataset"] = sum(len(nodes_from_keys(keys, batch, config)) for batch in batches)
    return counts


def _left_pad(lm, tokens: list[list[int]], prompt_ids: list[int]) -> PromptBatch:
    return PromptBatch.left_pad([tokens[i] for i in prompt_ids], [[] for _ in prompt_ids], lm.pad_id, lm.device)


if __name__ == "__main__":
    main()
