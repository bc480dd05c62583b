"""How well do the stats explainer's labels tell clusters apart on a traced run? Clusters each run (k
clusters, unless already clustered so), describes it offline (stats explainer, embed:minilm simulator)
and prints every label with its one-line descriptions, then the figures of issue 30:

    labels distinct after removing layer tags; labels whose output part is "all candidates"; labels whose
    input words are all found in the one-line input description; counts "n/N prompts" whose N is not the
    run's number of prompts.

    adag trace --model smollm2-135m --dataset benchmarks/data/freeform.jsonl --threshold 0.01 --out RUN
    python benchmarks/describe_labels.py RUN [RUN ...] --k 6
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adag.cluster import ClusterConfig, cluster_run  # noqa: E402
from adag.describe import DescribeConfig, describe_run  # noqa: E402
from adag.describe.labels import grounded  # noqa: E402
from adag.view import RunView  # noqa: E402


def figures(run: Path, k: int) -> None:
    view = RunView.open(run)
    if view.run.entry("cluster") is None or view.config("cluster")["k"] != k:
        cluster_run(str(run), ClusterConfig(k=k))
    describe_run(str(run), DescribeConfig(), progress=False)
    view = RunView.open(run)
    total = len(view.prompts)
    table = view.table("describe", "descriptions").sort_values("cluster")
    print(f"\n{run} ({total} prompts, k={k})")
    cores, all_candidates, ungrounded, wrong_counts = set(), 0, [], []
    for row in table.itertuples():
        print(f"  {row.cluster}  {row.label}\n     input:  {row.input_description}\n"
              f"     output: {row.output_description}")
        core = row.label.split(" @")[0]
        cores.add(core)
        all_candidates += core.removeprefix("not[").removesuffix("]").split(" -> ")[-1] == "all candidates"
        if not grounded(row.label, row.input_description or ""):
            ungrounded.append(row.label)
        texts = [row.input_description or "", row.output_description or "", *row.facts]
        wrong_counts += [m for text in texts for m in re.findall(r"in \d+/(\d+) prompts", text) if int(m) != total]
    print(f"  distinct labels without layer tags: {len(cores)}/{len(table)}; output part 'all candidates': "
          f"{all_candidates}; input part grounded in the description: {len(table) - len(ungrounded)}/{len(table)}; "
          f"counts not over all {total} prompts: {len(wrong_counts)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="traced runs (copied: the originals are not changed)")
    parser.add_argument("--k", type=int, default=6)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        for run in args.runs:
            copy = Path(scratch) / run.name
            shutil.copytree(run, copy, ignore=shutil.ignore_patterns(".lock", ".staging"))
            figures(copy, args.k)


if __name__ == "__main__":
    main()
