"""Trace prompts of `country-capitals` with every built-in model and print what a prompt costs.

    python benchmarks/trace_bench.py                                  # every built-in model, CPU, 2 threads
    python benchmarks/trace_bench.py --models smollm2-135m --batch-sizes 1,2,4
    python benchmarks/trace_bench.py --device cuda --dtype bfloat16

Per model and batch size (each model in its own process, so that peak memory is that model's): seconds
per prompt of the trace (`adag.trace.attribute`, default settings but the batch size) and the same in
units of one forward+backward of that model on the same prompts (weights frozen, gradient to the
input embeddings, measured in the same process between the traces, the fastest of 3), per phase; the median over
`--repeats`. On a shared machine seconds are noisy; units are the steadier figure. Also: peak RSS
(and peak GPU memory) against the weights plus the working-memory budget, the batch size that the
default rule picks (the least time per prompt), and the whole process (`adag trace --limit 2`,
start-up and model loading included) against its trace stage and against the floor that any such
command pays (torch and transformers imported, the model loaded, a Parquet table written).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time

PHASES = ("node_scores", "profiles", "edges")
FLOOR = """
import gc, sys
gc.disable()
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel  # its module: the heaviest
import pyarrow as pa, pyarrow.parquet as pq
gc.freeze()
gc.enable()
directory, dtype, device, out = sys.argv[1:]
AutoTokenizer.from_pretrained(directory)
AutoModelForCausalLM.from_pretrained(directory, dtype=getattr(torch, dtype), device_map=device)
pq.write_table(pa.table({"row": pa.array([0])}), out)
"""  # what any trace command on a transformers model that writes Parquet does before its first prompt
UNIT_RUNS = 3  # the unit is the fastest of these: a first run pays for warming up, a busy moment for noise


def main() -> None:
    from adag.models.loading import BUILTIN_MODELS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(BUILTIN_MODELS), help="comma-separated built-in models")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--batch-sizes", default="1,2", help="comma-separated")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--prompt-format", default="auto", choices=["auto", "chat", "plain"],
                        help="plain: the same text for every model (chat templates add a system prompt), so that "
                        "units compare at similar prompt lengths")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one model, print JSON
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args)))
        return
    print(f"{args.prompts} country-capitals prompts, {args.device} {args.dtype}, {args.threads} threads, "
          f"default settings, median of {args.repeats}; s = seconds per prompt, u = units of one fwd+bwd")
    print(f"{'model':<20} {'tokens':>6} {'batch':>5} {'fwd+bwd':>8} " + " ".join(f"{p:>14}" for p in (*PHASES, "total"))
          + f" {'nodes':>6} {'edges':>7} {'peak RSS':>9} {'weights+budget':>14}")
    for model in args.models.split(","):
        command = [sys.executable, __file__, "--one", model, *_passed_on(args)]
        result = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
        for size, row in result["batches"].items():
            cells = [f"{row[p]:6.2f}s {row[p] / row['unit']:5.1f}u" for p in (*PHASES, "total")]
            print(f"{model:<20} {result['tokens']:6.1f} {size:>5} {row['unit']:7.3f}s " + " ".join(cells)
                  + f" {row['node_count']:6.0f} {row['edge_count']:7.0f} {result['peak_rss_mib']:6.0f} MiB "
                  f"{result['weights_mib'] + result['budget_mib']:10.0f} MiB")
        fastest = min(result["batches"], key=lambda size: result["batches"][size]["total"])
        print(f"{model:<20} default-rule batch size here: {fastest}; "
              + whole_process(model, args))


def _passed_on(args: argparse.Namespace) -> list[str]:
    return [f"--prompts={args.prompts}", f"--batch-sizes={args.batch_sizes}", f"--repeats={args.repeats}",
            f"--threads={args.threads}", f"--device={args.device}", f"--dtype={args.dtype}",
            f"--prompt-format={args.prompt_format}"]


def measure(model: str, args: argparse.Namespace) -> dict:
    """One model's figures per batch size: seconds per prompt per phase and of one forward+backward."""
    import torch

    from adag.datasets import encode_prompt, load_dataset
    from adag.models import load_model
    from adag.trace import PromptBatch, TraceConfig
    from adag.trace.attribute import PhaseTimer, attribute
    from adag.trace.passes import working_memory

    torch.set_num_threads(args.threads)
    lm = load_model(model, dtype=args.dtype, device=args.device)
    tokens = [encode_prompt(lm.tokenizer, row, args.prompt_format)
              for row in load_dataset("country-capitals", limit=args.prompts).rows]
    batches = {}
    for size in [int(b) for b in args.batch_sizes.split(",")]:
        config = TraceConfig(batch_size=size, prompt_format=args.prompt_format)
        runs = []
        for _ in range(args.repeats):
            timer, unit, node_count, edge_count = PhaseTimer(lm.device), 0.0, 0, 0
            for first in range(0, len(tokens), size):
                chunk = tokens[first:first + size]
                batch = PromptBatch.left_pad(chunk, [[]] * len(chunk), lm.pad_id, lm.device)
                unit += min(_forward_backward_seconds(lm, batch) for _ in range(UNIT_RUNS))
                result = attribute(lm, config, batch, timer=timer)
                node_count += len(result.profiles.nodes)
                edge_count += len(result.edges)
            runs.append({**timer.seconds, "unit": unit, "node_count": node_count, "edge_count": edge_count})
        batches[size] = {key: statistics.median(run[key] for run in runs) / len(tokens)
                         for key in (*PHASES, "unit", "node_count", "edge_count")}
        batches[size]["total"] = statistics.median(sum(run[p] for p in PHASES) for run in runs) / len(tokens)
    weights = sum(p.numel() * p.element_size() for p in lm.model.parameters())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if lm.device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(lm.device) / 2**20
    return {"batches": batches, "tokens": statistics.mean(len(t) for t in tokens), "peak_rss_mib": peak,
            "weights_mib": weights / 2**20, "budget_mib": working_memory(TraceConfig(), lm.device) / 2**20}


def _forward_backward_seconds(lm, batch) -> float:
    """One plain forward+backward of the batch: weights frozen, gradient to the input embeddings."""
    import torch

    started = time.perf_counter()
    with torch.enable_grad():
        inputs = lm.model.get_input_embeddings()(batch.input_ids).detach().requires_grad_(True)
        logits = lm.model(inputs_embeds=inputs, attention_mask=batch.attention_mask,
                          position_ids=batch.position_ids, logits_to_keep=1).logits
        logits[:, -1].max(-1).values.sum().backward()
    if lm.device.type == "cuda":
        torch.cuda.synchronize(lm.device)
    return time.perf_counter() - started


def whole_process(model: str, args: argparse.Namespace) -> str:
    """`adag trace --limit 2` from the command line: its wall time against the trace stage's seconds, and
    against the floor under any such command: a process that only imports torch and transformers, loads
    the model and tokenizer with them and writes one Parquet table (with the collector paused during the
    imports, as `adag` pauses it). The floor bounds the ratio from below: (floor + trace stage) / trace
    stage. Alternated `--repeats` times; medians."""
    from adag.models.loading import model_directory

    directory, walls, stages, floors = str(model_directory(model)), [], [], []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            out = f"{tmp}/run"
            walls.append(_seconds([sys.executable, "-m", "adag", "trace", "--model", model, "--dataset",
                                   "country-capitals", "--limit", "2", "--out", out, "--device", args.device,
                                   "--dtype", args.dtype, "--prompt-format", args.prompt_format], args))
            with open(f"{out}/manifest.json") as f:
                stages.append(json.load(f)["stages"]["trace"]["seconds"])
            floors.append(_seconds([sys.executable, "-c", FLOOR, directory, args.dtype, args.device,
                                    f"{tmp}/floor.parquet"], args))
    wall, stage, floor = (statistics.median(values) for values in (walls, stages, floors))
    return (f"whole process for 2 prompts {wall:.1f}s, trace stage {stage:.1f}s ({wall / stage:.2f}x); the floor "
            f"(torch and transformers imported, model loaded, a table written) {floor:.1f}s, so at least "
            f"{(floor + stage) / stage:.2f}x; adag's own part {wall - stage - floor:.1f}s")


def _seconds(command: list[str], args: argparse.Namespace) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, env=_env(args.threads))
    return time.perf_counter() - started


def _env(threads: int) -> dict:
    import os

    return {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}


if __name__ == "__main__":
    main()
