"""Cluster synthetic half-neurons at the scale of a large run and print time and peak memory.

    python benchmarks/cluster_bench.py --half-neurons 5000 --prompts 1000 --compare
    python benchmarks/cluster_bench.py --half-neurons 50000 --prompts 10000 --occurrence 0.01

The first clusters 5,000 half-neurons both with the dense reference algorithm and with the sparse
nearest-neighbour similarity, and prints their agreement (goal: adjusted Rand index >= 0.95). The
second is a 10,000-prompt run with about 500 kept nodes per prompt (goal on a 2-core machine: under
10 minutes and under 8 GB peak RSS, the synthetic tables included). The cost of the similarity grows
with the sum over prompts of (nodes in the prompt)^2, so nodes per prompt are printed too.
"""

from __future__ import annotations

import argparse
import resource
import time

from sklearn.metrics import adjusted_rand_score

from adag.cluster import ClusterConfig, ProfileClustering, half_neuron_profiles
from tests.planted import planted_tables


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _cpu_s() -> float:
    """CPU seconds of this process (user + system): on a shared machine, steadier than wall time."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    defaults = ClusterConfig()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--half-neurons", type=int, default=5000)
    parser.add_argument("--prompts", type=int, default=1000)
    parser.add_argument("--groups", type=int, default=20)
    parser.add_argument("--occurrence", type=float, default=0.05, help="chance a half-neuron occurs in a prompt")
    parser.add_argument("--noise", type=float, default=0.3, help="noise of the planted profiles")
    parser.add_argument("--method", default="spectral")
    parser.add_argument("--neighbors", type=int, default=defaults.neighbors)
    parser.add_argument("--dense-limit", type=int, default=defaults.dense_limit)
    parser.add_argument("--compare", action="store_true", help="cluster with both the dense and the sparse "
                        "similarity and print their agreement")
    args = parser.parse_args()

    per_group = args.half_neurons // args.groups
    nodes, prompts, truth = planted_tables([(g % 8, g) for g in range(args.groups)], per_group, args.prompts,
                                           occurrence=args.occurrence, noise=args.noise)
    tables_peak = _peak_mib()
    started, started_cpu = time.perf_counter(), _cpu_s()
    profiles = half_neuron_profiles(nodes, prompts)
    built = time.perf_counter()
    truth = truth[profiles.keys["neuron"].to_numpy()]
    print(f"{len(profiles)} half-neurons, {args.prompts} prompts, {len(nodes)} nodes "
          f"({len(nodes) / args.prompts:.0f} per prompt), method {args.method}, k {args.groups}")
    print(f"  profiles   {built - started:7.1f} s")
    limits = {"dense": len(profiles), "sparse": 1} if args.compare else {"default": args.dense_limit}
    labels = {}
    for name, dense_limit in limits.items():
        begin = time.perf_counter()
        model = ProfileClustering(args.groups, method=args.method, neighbors=args.neighbors,
                                  dense_limit=dense_limit).fit(profiles)
        labels[name] = model.labels_
        diagnostics = model.diagnostics_
        print(f"  {name}: {diagnostics['similarity']} similarity; similarity + clustering + diagnostics "
              f"{time.perf_counter() - begin:7.1f} s; adjusted Rand index vs planted groups "
              f"{adjusted_rand_score(truth, model.labels_):.3f}; silhouette {diagnostics['silhouette']:.3f}")
    print(f"  total      {time.perf_counter() - started:7.1f} s wall, {_cpu_s() - started_cpu:7.1f} s CPU "
          "(profiles, similarity, clustering, diagnostics)")
    print(f"  peak RSS   {_peak_mib():7.0f} MiB (synthetic tables alone: {tables_peak:.0f} MiB)")
    if args.compare:
        print(f"  adjusted Rand index dense vs sparse {adjusted_rand_score(labels['dense'], labels['sparse']):.3f}")


if __name__ == "__main__":
    main()
