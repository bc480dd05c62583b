"""Trace N prompts of `country-capitals` on the built-in model and print where the time goes.

    python benchmarks/trace_bench.py --prompts 4 --batch-size 4

Prints per-prompt seconds by phase (node pass, profiles, edges), peak RSS, node and edge counts,
and the overhead factor: tracing time / one plain forward+backward on the same batch.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from adag.datasets import encode_prompt, load_dataset
from adag.models import load_model
from adag.trace import PromptBatch, TraceConfig, attribute, node_scores, select_nodes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threshold", type=float, default=0.005)
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--model", default="smollm2-135m")
    args = parser.parse_args()

    lm = load_model(args.model)
    rows = load_dataset("country-capitals", limit=args.prompts).rows
    config = TraceConfig(aggregation="none", threshold=args.threshold, chunk_size=args.chunk_size)
    times = {"node pass": 0.0, "profiles": 0.0, "edges": 0.0, "plain forward+backward": 0.0}
    nodes_total = edges_total = 0
    for start in range(0, len(rows), args.batch_size):
        chunk = rows[start:start + args.batch_size]
        batch = PromptBatch.left_pad([encode_prompt(lm.tokenizer, r) for r in chunk], [[] for _ in chunk],
                                     lm.tokenizer.pad_token_id or 0, lm.device)
        times["plain forward+backward"] += _plain_forward_backward(lm, batch)
        started = time.perf_counter()
        nodes = select_nodes(node_scores(lm, config, batch)[0], config)
        times["node pass"] += time.perf_counter() - started
        started = time.perf_counter()
        attribute(lm, config.model_copy(update={"edges": False}), batch, nodes)
        profiles = time.perf_counter() - started
        started = time.perf_counter()
        result = attribute(lm, config, batch, nodes)
        times["profiles"] += profiles
        times["edges"] += max(0.0, time.perf_counter() - started - profiles)
        nodes_total += len(nodes)
        edges_total += len(result.edges)

    n = len(rows)
    tracing = times["node pass"] + times["profiles"] + times["edges"]
    print(f"model {args.model}, {n} prompts, batch {args.batch_size}, threshold {args.threshold}, "
          f"chunk {args.chunk_size}, torch threads {torch.get_num_threads()}")
    for phase, seconds in times.items():
        print(f"  {phase:24s} {seconds / n:8.3f} s/prompt")
    print(f"  {'tracing total':24s} {tracing / n:8.3f} s/prompt")
    print(f"  nodes {nodes_total / n:.0f}/prompt, neuron->neuron edges {edges_total / n:.0f}/prompt")
    print(f"  overhead factor {tracing / times['plain forward+backward']:.0f}x a plain forward+backward")
    print(f"  peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


def _plain_forward_backward(lm, batch: PromptBatch) -> float:
    embeddings = lm.model.get_input_embeddings()
    started = time.perf_counter()
    with torch.enable_grad():
        inputs = embeddings(batch.input_ids).detach().requires_grad_(True)
        logits = lm.model(inputs_embeds=inputs, attention_mask=batch.attention_mask,
                          position_ids=batch.position_ids, logits_to_keep=1).logits
        logits[:, -1].max(-1).values.sum().backward()
    return time.perf_counter() - started


if __name__ == "__main__":
    main()
