"""What the local LLM backend's shared-prefix cache and batched simulator save, on a real model.

    python benchmarks/local_llm_bench.py                                  # the built-in SmolLM2-135M
    python benchmarks/local_llm_bench.py --model qwen2.5-coder-1.5b --requests 4 --records 8

Explainer: `--requests` input-description requests (instruction and worked examples, then a different
capitals excerpt each), greedy, with and without the prefix cache. Simulator: `--records` held-out
records scored against one description, together (`--batch-size` per pass, prefix cached) and one at a
time from scratch. Prints seconds per request and checks that both ways give the same replies.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adag.describe.prompts import explain_messages  # noqa: E402
from adag.llm.local import LocalBackend  # noqa: E402
from adag.llm.simulation import Simulation  # noqa: E402
from adag.models import load_model  # noqa: E402

COUNTRIES = ["France", "Japan", "Peru", "Kenya", "Norway", "Egypt", "Chile", "India", "Spain", "Ghana", "Iran", "Cuba"]


def timed(call):
    """The result, and the seconds it took: wall-clock and this process's CPU time (on a shared machine
    the CPU time is the steadier figure)."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = call()
    return result, (time.perf_counter() - wall, time.process_time() - cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--requests", type=int, default=6, help="explainer requests")
    parser.add_argument("--records", type=int, default=12, help="simulator records")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=16)
    args = parser.parse_args()

    lm, load_s = timed(lambda: load_model(args.model))
    print(f"{args.model}: loaded in {load_s[0]:.1f}s; seconds below are wall / CPU")
    cached = LocalBackend(args.model, lm=lm, batch_size=args.batch_size)
    plain = LocalBackend(args.model, lm=lm, prefix_caching=False, batch_size=1)

    requests = [explain_messages("input", [f"What is the capital of {{{{{c}}}}}? Answer: {c}'s capital",
                                           f"The capital of {{{{{d}}}}} is"])
                for c, d in zip(COUNTRIES, COUNTRIES[1:] + COUNTRIES[:1])][:args.requests]
    print(f"explainer: {len(requests)} requests of {len(cached._encode(requests[0]))} tokens, "
          f"{args.max_tokens} new tokens at most")
    replies, cpu = {}, {}
    for name, backend in (("from scratch", plain), ("prefix cached", cached)):
        replies[name], seconds = timed(lambda b=backend: [b.complete(m, 0.0, args.max_tokens, False, 0, 600).text
                                                          for m in requests])
        wall, cpu[name] = (s / len(requests) for s in seconds)
        print(f"  {name:14s} {wall:6.2f} / {cpu[name]:6.2f} s/request   first reply: {replies[name][0]!r}")
    print(f"  same replies: {replies['from scratch'] == replies['prefix cached']}   "
          f"speed-up (CPU) {cpu['from scratch'] / cpu['prefix cached']:.1f}x")

    records = [Simulation("input", "names of countries", tuple(
        ["What", " is", " the", " capital", " of", f" {c}", "?", " Answer", ":"] + [" The"] * (i % 4)))
        for i, c in enumerate((COUNTRIES * 4)[:args.records])]
    print(f"simulator: {len(records)} records against one description")
    one, one_s = timed(lambda: [plain.predict(r, 0, 600).values for r in records])
    print(f"  one at a time  {one_s[0] / len(records):6.2f} / {one_s[1] / len(records):6.2f} s/record")
    together, together_s = timed(lambda: [p.values for p in cached.predict_many(records, 0, 600)])
    print(f"  batched ({args.batch_size})    {together_s[0] / len(records):6.2f} / {together_s[1] / len(records):6.2f} "
          f"s/record   speed-up (CPU) {one_s[1] / together_s[1]:.1f}x")
    largest = max(abs(a - b) for x, y in zip(one, together) for a, b in zip(x, y))
    print(f"  largest difference: {largest:.2e}")


if __name__ == "__main__":
    main()
