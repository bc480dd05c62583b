import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import adjusted_rand_score

from adag.cluster import ClusterConfig, ProfileClustering, cluster_run, combine_views, half_neuron_profiles, similarity
from adag.cluster.synthetic import planted_tables
from adag.datasets import load_dataset
from adag.errors import AdagError
from adag.store import RunDir
from adag.trace import TraceConfig, trace_dataset


def _tables(records, lengths, k=2):
    """records: (prompt, layer, neuron, activation, input_profile, output_profile)."""
    nodes = pd.DataFrame([
        {"prompt": p, "node": i, "layer": layer, "position": len(inp) - 1, "neuron": neuron, "activation": act,
         "attribution": 1.0, "input_profile": np.array(inp, dtype=np.float32),
         "output_profile": np.array(out, dtype=np.float32)}
        for i, (p, layer, neuron, act, inp, out) in enumerate(records)
    ])
    prompts = pd.DataFrame({"prompt": range(len(lengths)), "n_tokens": lengths})
    return nodes, prompts


def _cos(u, v):
    u, v = np.asarray(u, float), np.asarray(v, float)
    return u @ v / np.linalg.norm(u) / np.linalg.norm(v)


def test_similarity_by_hand():
    a_in, b_in = [1.0, 2.0, 0.0], [2.0, 1.0, 1.0]
    a_out, b_out = [1.0, 0.0], [1.0, 1.0]
    records = [
        (0, 0, 1, 1.0, a_in, a_out), (0, 1, 2, 1.0, b_in, b_out),   # A and B share prompt 0
        (1, 0, 1, 1.0, [0.0, 1.0, 3.0, 1.0], [0.0, 1.0]),            # A alone in prompt 1
        (2, 1, 7, -1.0, [1.0, 1.0], [1.0, -1.0]),                    # C never meets A or B
    ]
    nodes, prompts = _tables(records, [3, 4, 2])
    profiles = half_neuron_profiles(nodes, prompts)
    keys = list(map(tuple, profiles.keys[["layer", "neuron", "polarity"]].to_numpy()))
    a, b, c = keys.index((0, 1, 1)), keys.index((1, 2, 1)), keys.index((1, 7, -1))
    s = similarity(profiles)
    x, y = _cos(a_in, b_in), _cos(a_out, b_out)
    assert s[a, b] == pytest.approx(2 * x * y / (x + y), rel=1e-6)  # only prompt 0 counts
    assert s[a, c] == 0 and s[b, c] == 0
    assert s[a, a] == pytest.approx(1.0, rel=1e-6)
    assert pytest.approx(s[b, a]) == s[a, b]
    mean = similarity(profiles, "mean")
    assert mean[a, b] == pytest.approx((x + y) / 2, rel=1e-6)


def test_average_over_co_occurring_prompts_and_sum_over_positions():
    records = [
        (0, 0, 1, 1.0, [1.0, 0.0], [1.0, 0.0]), (0, 0, 2, 1.0, [1.0, 0.0], [1.0, 0.0]),
        (1, 0, 1, 1.0, [1.0, 0.0, 0.0], [1.0, 0.0]), (1, 0, 2, 1.0, [0.0, 0.0, 1.0], [0.0, 1.0]),
        (1, 0, 2, 1.0, [0.0, 1.0, 0.0], [0.0, 1.0]),  # a second position of the same half-neuron
        (2, 0, 2, 1.0, [1.0], [1.0, 0.0]),             # only one of the two occurs here
    ]
    nodes, prompts = _tables(records, [2, 3, 1])
    s = similarity(half_neuron_profiles(nodes, prompts))
    # prompt 0: both views 1; prompt 1: input cos 0, output cos 0 -> each view averages to 0.5
    assert s[0, 1] == pytest.approx(0.5, rel=1e-6)


def test_input_profile_is_divided_by_its_sum_first():
    records = [(0, 0, 1, 1.0, [1.0, 2.0], [1.0, 0.0]), (0, 0, 2, 1.0, [-1.0, -2.0], [1.0, 0.0])]
    nodes, prompts = _tables(records, [2])
    s = similarity(half_neuron_profiles(nodes, prompts), "input")
    assert s[0, 1] == pytest.approx(1.0, rel=1e-6)  # same shape once normalised by the (negative) sum


def test_combination_rules():
    has, hasnt = np.array([True]), np.array([False])
    h = combine_views(np.array([0.5]), np.array([1.0]), has, has)
    assert h[0] == pytest.approx(2 * 0.5 / 1.5)
    assert combine_views(np.array([-0.3]), np.array([0.8]), has, has)[0] == 0  # clamped at 0
    assert combine_views(np.array([0.0]), np.array([0.0]), has, has)[0] == 0
    assert combine_views(np.array([0.4]), np.array([0.0]), has, hasnt)[0] == pytest.approx(0.4)  # one view
    assert combine_views(np.array([0.0]), np.array([0.7]), hasnt, has)[0] == pytest.approx(0.7)
    assert combine_views(np.array([0.9]), np.array([0.9]), hasnt, hasnt)[0] == 0


def test_one_view_fallback_when_outputs_vanish():
    records = [(0, 0, 1, 1.0, [1.0, 1.0], [0.0, 0.0]), (0, 0, 2, 1.0, [1.0, 0.0], [0.0, 0.0])]
    nodes, prompts = _tables(records, [2])
    s = similarity(half_neuron_profiles(nodes, prompts))
    assert s[0, 1] == pytest.approx(_cos([0.5, 0.5], [1.0, 0.0]), rel=1e-6)


def _ari(profiles, truth, labels):
    return adjusted_rand_score(truth[profiles.keys["neuron"].to_numpy()], labels)


def test_planted_groups_are_recovered():
    groups = [(0, 0), (2, 1), (4, 2), (6, 3), (8, 4), (10, 5)]
    nodes, prompts, truth = planted_tables(groups, per_group=25, n_prompts=80, occurrence=0.25, noise=0.6)
    profiles = half_neuron_profiles(nodes, prompts)
    model = ProfileClustering(6).fit(profiles)
    assert _ari(profiles, truth, model.labels_) >= 0.9
    assert model.suggested_k_ == 6
    assert model.diagnostics_["intra_inter_ratio"] > 1


def test_both_views_are_needed_when_groups_differ_in_one_view_each():
    nodes, prompts, truth = planted_tables([(0, 0), (0, 1), (3, 0), (3, 1)], per_group=25, n_prompts=60,
                                           occurrence=0.3, noise=0.3)
    profiles = half_neuron_profiles(nodes, prompts)
    scores = {how: _ari(profiles, truth, ProfileClustering(4, combine=how).fit(profiles).labels_)
              for how in ("harmonic", "input", "output")}
    assert scores["harmonic"] >= 0.9
    assert scores["input"] < scores["harmonic"] - 0.3 and scores["output"] < scores["harmonic"] - 0.3


@pytest.mark.parametrize("method", ["spectral", "agglomerative", "kmeans", "leiden"])
def test_methods_are_deterministic_and_find_planted_groups(method):
    nodes, prompts, truth = planted_tables([(0, 0), (3, 1), (6, 2)], per_group=20, n_prompts=40, noise=0.3)
    profiles = half_neuron_profiles(nodes, prompts)
    first = ProfileClustering(3, method=method).fit(profiles).labels_
    second = ProfileClustering(3, method=method).fit(profiles).labels_
    assert np.array_equal(first, second)
    assert _ari(profiles, truth, first) >= 0.9


def test_cluster_stage_on_a_traced_run(tiny_models, tmp_path):
    lm = tiny_models["llama"]
    trace_dataset(lm, load_dataset("country-capitals", limit=6), TraceConfig(threshold=0.02), tmp_path,
                  progress=False)
    run = cluster_run(str(tmp_path), ClusterConfig(k=4))
    assert run.stage_done("cluster")
    half = run.read_table("cluster", "half_neurons")
    clusters = run.read_table("cluster", "clusters")
    assert sorted(half["cluster"].unique()) == list(range(4)) and clusters["size"].sum() == len(half)
    per_prompt = run.read_table("cluster", "prompt_clusters")
    nodes = run.read_table("trace", "nodes")
    # Two float32 sums of the same signed values in different orders: each is within
    # n * eps32 * sum|x| of the exact sum, whatever the order (relative error can blow up on cancellation).
    bound = 2 * len(nodes) * float(np.finfo(np.float32).eps) * float(nodes["attribution"].abs().sum())
    assert per_prompt["attribution"].sum() == pytest.approx(nodes["attribution"].sum(), abs=bound)
    polarity = np.where(nodes["activation"] < 0, -1, 1)
    members = nodes.assign(polarity=polarity).merge(half, on=["layer", "neuron", "polarity"])
    assert members["attribution_x"].abs().groupby(members["cluster"]).sum().idxmax() == 0
    edges = run.read_table("cluster", "cluster_edges")
    assert (edges["source_cluster"] != edges["target_cluster"]).all()
    for name in ("input_attachments", "logit_attachments", "mean_clusters", "mean_cluster_edges"):
        assert len(run.read_table("cluster", name))
    diagnostics = run.read_json("cluster", "diagnostics")
    assert diagnostics["k"] == 4 and diagnostics["suggested_k"] >= 1
    again = cluster_run(str(tmp_path), ClusterConfig(k=4))
    pd.testing.assert_frame_equal(half, again.read_table("cluster", "half_neurons"))


def test_cluster_needs_a_trace(tmp_path):
    RunDir.create(tmp_path, {"spec": "m"}, {"name": "d"})
    with pytest.raises(AdagError, match="no finished 'trace' stage"):
        cluster_run(str(tmp_path), ClusterConfig())
