"""Compare the reference clustering with its older variants on a traced run and print their agreement.

    adag trace --model smollm2-135m --dataset country-capitals --limit 8 --threshold 0.01 --out /tmp/cl-demo
    python benchmarks/cluster_variants.py /tmp/cl-demo --k 8

Clusters the run's half-neurons with each combination of views (raw | share) and embedding
(reference | sklearn) and prints the adjusted Rand index of each against the default (raw, reference).
Nothing is written to the run directory.
"""

from __future__ import annotations

import argparse
import itertools

from sklearn.metrics import adjusted_rand_score

from adag.cluster import ProfileClustering, half_neuron_profiles
from adag.view import RunView


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    view = RunView.open(args.run_dir)
    nodes, prompts = view.nodes, view.prompts
    keep_first = view.config("trace")["keep_first_position"]
    labels = {}
    for views, embedding in itertools.product(("raw", "share"), ("reference", "sklearn")):
        profiles = half_neuron_profiles(nodes, prompts, views, keep_first_position=keep_first)
        model = ProfileClustering(args.k, embedding=embedding, random_state=args.seed).fit(profiles)
        labels[views, embedding] = model.labels_
        print(f"views {views:5} embedding {embedding:9}: silhouette {model.diagnostics_['silhouette']:.3f}, "
              f"suggested k {model.suggested_k_}")
    default = labels["raw", "reference"]
    print(f"{len(default)} half-neurons, {len(prompts)} prompts, k {args.k}; adjusted Rand index against the "
          "default (views raw, embedding reference):")
    for (views, embedding), other in labels.items():
        print(f"  views {views:5} embedding {embedding:9}  {adjusted_rand_score(default, other):.3f}")


if __name__ == "__main__":
    main()
