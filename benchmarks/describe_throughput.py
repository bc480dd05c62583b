"""Requests per second that `adag describe` sends to an OpenAI-compatible server, by concurrency.

    python benchmarks/describe_throughput.py                     # 64 clusters, concurrency 1, 8, 32
    python benchmarks/describe_throughput.py --latency 0.2 --concurrency 1,4,16,64

The server is tests/fake_openai.py in its own process (so that it does not share this process's
interpreter lock), answering every request after `--latency` seconds, as a loaded vLLM server might.
The run is synthetic (tests/synthetic.py) with `--clusters` clusters; every concurrency level
describes a fresh copy of it with an empty reply cache, explainer and simulator both the fake server.
An ideal client reaches concurrency / latency requests per second.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adag.describe import DescribeConfig, describe_run  # noqa: E402
from tests.synthetic import synthetic_run  # noqa: E402

SERVER = """
import sys, time
from tests.fake_openai import FakeOpenAI
with FakeOpenAI(delay=float(sys.argv[1])) as server:
    print(server.url, flush=True)
    sys.stdin.read()  # until the benchmark closes our stdin
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clusters", type=int, default=64)
    parser.add_argument("--prompts", type=int, default=16, help="prompts of the synthetic run")
    parser.add_argument("--concurrency", default="1,8,32", help="comma-separated levels")
    parser.add_argument("--latency", type=float, default=0.1, help="seconds the server waits before each reply")
    parser.add_argument("--samples", type=int, default=1, help="candidate descriptions per explanation")
    args = parser.parse_args()

    repo = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory() as scratch:
        run = Path(scratch) / "run"
        synthetic_run(run, prompts=args.prompts, clusters=args.clusters, nodes=120)
        server = subprocess.Popen([sys.executable, "-c", SERVER, str(args.latency)], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True, cwd=repo,
                                  env=os.environ | {"PYTHONPATH": str(repo)})
        try:
            spec = f"openai:fake@{server.stdout.readline().strip()}"
            print(f"{args.clusters} clusters, {args.samples} sample(s), server latency {args.latency * 1000:.0f} ms")
            print(f"{'concurrency':>11s} {'requests':>9s} {'seconds':>8s} {'req/s':>7s} {'ideal req/s':>12s}")
            for level in [int(c) for c in args.concurrency.split(",")]:
                os.environ["ADAG_CACHE"] = str(Path(scratch) / f"cache-{level}")  # nothing cached yet
                fresh = shutil.copytree(run, Path(scratch) / f"run-{level}")  # nothing described yet
                config = DescribeConfig(explainer=spec, simulator=spec, samples=args.samples)
                started = time.perf_counter()
                describe_run(fresh, config, progress=False, concurrency=level)
                seconds = time.perf_counter() - started
                requests = describe_ledger_calls(fresh)
                print(f"{level:11d} {requests:9d} {seconds:8.1f} {requests / seconds:7.1f} "
                      f"{level / args.latency:12.1f}", flush=True)
        finally:
            server.stdin.close()
            server.wait()


def describe_ledger_calls(run: Path) -> int:
    """Requests actually sent (not served from the cache) by the last describe."""
    from adag.store import RunDir

    ledger = RunDir.open(run).read_table("describe", "ledger")
    return int((~ledger["cached"]).sum())


if __name__ == "__main__":
    main()
