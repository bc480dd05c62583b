"""Size and load time of the HTML report (and the served viewer) for synthetic runs of demo shape.

    python benchmarks/report_bench.py --prompts 8 1000

Each run is shaped like the demo run (SmolLM2-135M, country-capitals, threshold 0.01): 30 layers,
prompts of about 40 tokens with about 320 nodes each (85% at the last position), a third of the
tokens kept as embedding nodes, and about 19,000 direct edges per prompt. The report embeds the
cluster views and at most 50 prompt graphs; load time is from navigation until the page has drawn
both graphs, in headless Chromium.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import urllib.request
from pathlib import Path

from adag.report import serve_in_background, write_report
from adag.report.config import ReportConfig
from adag.store import RunDir
from tests.browser import chromium, open_page
from tests.synthetic import synthetic_run


def _load_seconds(url: str) -> float:
    with chromium() as driver:
        driver.get("about:blank")  # the browser is up before the clock starts
        started = time.perf_counter()
        open_page(driver, url)
        return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, nargs="+", default=[8, 1000])
    parser.add_argument("--embedded", type=int, default=50, help="prompt graphs embedded in the report")
    args = parser.parse_args()
    for prompts in args.prompts:
        with tempfile.TemporaryDirectory() as folder:
            run = Path(folder) / "run"
            started = time.perf_counter()
            synthetic_run(run, prompts=prompts, layers=30, nodes=320, last_share=0.85, length=(36, 44), neurons=60,
                          clusters=8 if prompts < 100 else 20, edge_density=0.4, labels=["a cluster label"])
            made = time.perf_counter() - started
            started = time.perf_counter()
            path, embedded, total = write_report(str(run), str(run / "report.html"),
                                                 ReportConfig(prompts=args.embedded))
            written = time.perf_counter() - started
            load = _load_seconds(path.as_uri())
            started = time.perf_counter()
            server = serve_in_background(str(run))
            ready = time.perf_counter() - started
            try:
                base = f"http://127.0.0.1:{server.server_port}"
                served_load = _load_seconds(base + "/")
                first_graph = time.perf_counter()
                with urllib.request.urlopen(f"{base}/api/prompt/{total - 1}") as response:
                    graph = json.loads(response.read())
                first_graph = time.perf_counter() - first_graph
            finally:
                server.shutdown()
                server.server_close()
            edges = len(RunDir.open(run).read_table("trace", "edges", columns=["prompt"]))
            print(f"{total} prompts, {edges / total:.0f} edges per prompt (synthetic run built in {made:.0f} s), "
                  f"{embedded} prompt graphs embedded:")
            print(f"  report      {path.stat().st_size / 2**20:6.2f} MiB, written in {written:5.1f} s, "
                  f"loads in {load:5.2f} s")
            print(f"  served      server ready in {ready:5.1f} s; page with cluster views and a prompt graph loads "
                  f"in {served_load:5.2f} s; one more prompt graph ({len(graph['neurons']['kind'])} nodes) "
                  f"served in {first_graph:5.2f} s")


if __name__ == "__main__":
    main()
