"""Cluster synthetic half-neurons at the scale of a large run and print time and peak memory.

    python benchmarks/cluster_bench.py --half-neurons 5000 --prompts 1000

Goal on a 2-core machine: under 60 s and under 4 GB for 5,000 half-neurons over 1,000 prompts.
"""

from __future__ import annotations

import argparse
import resource
import time

from sklearn.metrics import adjusted_rand_score

from adag.cluster import ProfileClustering, half_neuron_profiles
from adag.cluster.synthetic import planted_tables


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--half-neurons", type=int, default=5000)
    parser.add_argument("--prompts", type=int, default=1000)
    parser.add_argument("--groups", type=int, default=20)
    parser.add_argument("--occurrence", type=float, default=0.05, help="chance a half-neuron occurs in a prompt")
    parser.add_argument("--method", default="spectral")
    args = parser.parse_args()

    per_group = args.half_neurons // args.groups
    nodes, prompts, truth = planted_tables([(g % 8, g) for g in range(args.groups)], per_group, args.prompts,
                                           occurrence=args.occurrence, noise=0.3)
    rss_data = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    started = time.perf_counter()
    profiles = half_neuron_profiles(nodes, prompts)
    built = time.perf_counter()
    model = ProfileClustering(args.groups, method=args.method).fit(profiles)
    done = time.perf_counter()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    score = adjusted_rand_score(truth[profiles.keys["neuron"].to_numpy()], model.labels_)
    print(f"{len(profiles)} half-neurons, {args.prompts} prompts, {len(nodes)} nodes, method {args.method}, "
          f"k {args.groups}")
    print(f"  profiles   {built - started:7.1f} s")
    print(f"  similarity + clustering + diagnostics {done - built:7.1f} s")
    print(f"  total      {done - started:7.1f} s")
    print(f"  peak RSS   {peak:7.0f} MiB (synthetic tables alone: {rss_data:.0f} MiB)")
    print(f"  adjusted Rand index vs planted groups {score:.3f}; silhouette {model.diagnostics_['silhouette']:.3f}")


if __name__ == "__main__":
    main()
