"""Trace prompts of `country-capitals` and print where the time goes, per phase and batch size.

    python benchmarks/trace_bench.py                         # built-in model, CPU, 2 threads
    python benchmarks/trace_bench.py --batch-sizes 4 --input-profiles vjp   # the backward-mode profiles
    python benchmarks/trace_bench.py --device cuda --dtype bfloat16

For each batch size, the prompts are traced `--repeats` times; every figure is the median over the
repeats, in seconds per prompt: wall-clock and CPU time (process time, all threads: on a shared
machine it is steadier than wall-clock). Also printed: the input-profile mode chosen per batch,
node and edge counts, the overhead against a plain forward+backward, peak RSS (process lifetime,
so it only grows down the table) and, on a GPU, peak GPU memory per batch size.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time
from collections import Counter, defaultdict
from collections.abc import Callable

import torch

from adag.datasets import encode_prompt, load_dataset
from adag.models import load_model
from adag.trace import PromptBatch, TraceConfig, edges_pass, node_scores, profiles_pass, select_nodes

PHASES = ("node pass", "profiles", "edges")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--batch-sizes", default="1,2,4", help="comma-separated")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--threshold", type=float, default=0.005)
    parser.add_argument("--n-targets", type=int, default=5)
    parser.add_argument("--input-profiles", default="auto", choices=["auto", "forward", "vjp"])
    parser.add_argument("--chunk-size", type=int, default=None)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    lm = load_model(args.model, dtype=args.dtype, device=args.device)
    rows = load_dataset("country-capitals", limit=args.prompts).rows
    tokens = [encode_prompt(lm.tokenizer, row) for row in rows]
    config = TraceConfig(aggregation="none", threshold=args.threshold, n_targets=args.n_targets,
                         input_profiles=args.input_profiles, chunk_size=args.chunk_size)
    print(f"model {args.model} ({args.dtype}, {args.device}), {len(rows)} prompts of "
          f"{min(map(len, tokens))}-{max(map(len, tokens))} tokens, threshold {args.threshold}, "
          f"{args.n_targets} targets, input profiles {args.input_profiles}, torch threads {torch.get_num_threads()}, "
          f"median of {args.repeats} runs; seconds per prompt, wall / CPU")
    print(f"{'batch':>5}  " + "  ".join(f"{phase:>15}" for phase in (*PHASES, "total")) +
          f"  {'plain f+b':>9}  {'overhead':>8}  {'nodes':>6}  {'edges':>6}  modes           peak RSS  peak GPU")
    for batch_size in [int(b) for b in args.batch_sizes.split(",")]:
        _bench_batch_size(lm, config, tokens, batch_size, args.repeats)


def _bench_batch_size(lm, config: TraceConfig, tokens: list[list[int]], batch_size: int, repeats: int) -> None:
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    batches = [PromptBatch.left_pad(tokens[i:i + batch_size], [[]] * len(tokens[i:i + batch_size]), pad, lm.device)
               for i in range(0, len(tokens), batch_size)]
    if lm.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(lm.device)
    runs: list[dict[str, tuple[float, float]]] = []
    modes: Counter[str] = Counter()
    counts = {"nodes": 0, "edges": 0}
    for _ in range(repeats):
        seconds: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
        modes.clear()
        counts.update(nodes=0, edges=0)
        for batch in batches:
            _timed(lm, seconds, "plain f+b", lambda b=batch: _plain_forward_backward(lm, b))
            nodes = _timed(lm, seconds, "node pass",
                           lambda b=batch: select_nodes(node_scores(lm, config, b)[0], config))
            profiles = _timed(lm, seconds, "profiles", lambda b=batch, n=nodes: profiles_pass(lm, config, b, n))
            edges = _timed(lm, seconds, "edges", lambda b=batch, p=profiles: edges_pass(lm, config, b, p))
            modes[profiles.input_profile_mode] += 1
            counts["nodes"] += len(nodes)
            counts["edges"] += len(edges)
        runs.append({phase: (wall, cpu) for phase, (wall, cpu) in seconds.items()})

    n = len(tokens)

    def median(phase: str, which: int) -> float:
        return statistics.median(run[phase][which] for run in runs) / n

    def total(which: int) -> float:
        return statistics.median(sum(run[p][which] for p in PHASES) for run in runs) / n

    cells = [f"{median(p, 0):7.2f} /{median(p, 1):6.2f}" for p in PHASES] + [f"{total(0):7.2f} /{total(1):6.2f}"]
    overhead = total(0) / median("plain f+b", 0)
    mode_text = ",".join(f"{mode}:{count}" for mode, count in sorted(modes.items()))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    gpu = f"{torch.cuda.max_memory_allocated(lm.device) / 2**20:7.0f} MiB" if lm.device.type == "cuda" else "-"
    print(f"{batch_size:>5}  " + "  ".join(f"{c:>15}" for c in cells) + f"  {median('plain f+b', 0):9.3f}  "
          f"{overhead:7.0f}x  {counts['nodes'] / n:6.0f}  {counts['edges'] / n:6.0f}  {mode_text:14s}  "
          f"{rss:6.0f} MiB  {gpu}")


def _timed(lm, seconds: dict[str, list[float]], phase: str, work: Callable):
    wall, cpu = time.perf_counter(), time.process_time()
    result = work()
    if lm.device.type == "cuda":
        torch.cuda.synchronize(lm.device)
    seconds[phase][0] += time.perf_counter() - wall
    seconds[phase][1] += time.process_time() - cpu
    return result


def _plain_forward_backward(lm, batch: PromptBatch) -> None:
    embeddings = lm.model.get_input_embeddings()
    with torch.enable_grad():
        inputs = embeddings(batch.input_ids).detach().requires_grad_(True)
        logits = lm.model(inputs_embeds=inputs, attention_mask=batch.attention_mask,
                          position_ids=batch.position_ids, logits_to_keep=1).logits
        logits[:, -1].max(-1).values.sum().backward()


if __name__ == "__main__":
    main()
