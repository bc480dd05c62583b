import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from pydantic import ValidationError
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score, silhouette_score
from typer.testing import CliRunner

from adag.cli import app
from adag.cluster import (
    ClusterConfig,
    ProfileClustering,
    cluster_run,
    combine_views,
    half_neuron_profiles,
    similarity,
    spectral,
)
from adag.cluster.graph import cluster_graph
from adag.cluster.similarity import knn_similarity
from adag.errors import AdagError
from adag.store import RunDir
from adag.view import RunView
from tests.planted import planted_tables
from tests.test_faults import error_line
from tests.test_store import snapshot

# Profiles are stored as float32 and the similarity products run in float32: a handful of roundings
# of eps32 ~ 1.2e-7 each, so 1e-6 relative.
FLOAT32 = 1e-6


def _tables(records, lengths, logits=None):
    """records: (prompt, layer, neuron, activation, input share, output share)."""
    nodes = pd.DataFrame([
        {"prompt": p, "node": i, "layer": layer, "position": len(inp) - 1, "neuron": neuron, "activation": act,
         "attribution": 1.0, "input_profile": np.array(inp, dtype=np.float32),
         "output_profile": np.array(out, dtype=np.float32)}
        for i, (p, layer, neuron, act, inp, out) in enumerate(records)
    ])
    k = len(records[0][5])
    logits = np.ones((len(lengths), k)) if logits is None else np.asarray(logits, float)
    prompts = pd.DataFrame({"prompt": range(len(lengths)), "n_tokens": lengths, "target_logits": list(logits)})
    return nodes, prompts


def _cos(u, v):
    u, v = np.asarray(u, float), np.asarray(v, float)
    return u @ v / np.linalg.norm(u) / np.linalg.norm(v)


def _harmonic(a, b):
    a, b = max(a, 0.0), max(b, 0.0)
    return 0.0 if a + b == 0 else 2 * a * b / (a + b)


def _index(profiles, *key):
    return list(map(tuple, profiles.keys[["layer", "neuron", "polarity"]].to_numpy())).index(key)


def test_similarity_known_answer():
    """Three half-neurons, two prompts; every view and the harmonic combination worked out here.
    A has two nodes in prompt 0; C is B's neuron with a negative activation; position 0 carries most
    of every input share; A and C's output views point in opposite directions."""
    logits = [[2.0, 4.0], [1.0, 5.0]]
    a1 = (0, 0, 1, 2.0, [0.7, 0.1, 0.1, 0.1], [0.05, 0.02])
    a2 = (0, 0, 1, 0.5, [0.6, 0.0, 0.2, 0.2], [0.04, 0.01])
    a3 = (1, 0, 1, 1.0, [0.8, 0.1, 0.1], [0.10, 0.02])
    b1 = (0, 1, 2, 4.0, [0.5, 0.3, 0.1, 0.1], [0.03, 0.03])
    b2 = (1, 1, 2, 2.0, [0.9, 0.05, 0.05], [0.05, 0.01])
    c1 = (0, 1, 2, -1.0, [0.9, 0.0, 0.05, 0.05], [-0.02, -0.01])
    nodes, prompts = _tables([a1, a2, a3, b1, b2, c1], [4, 3], logits)

    def raw_views(records, first):
        """Input: sum of share * activation over the node's positions from `first` on, divided by
        its sum, unit length. Output: sum of share * target logit, unit length."""
        inputs = sum(r[3] * np.array(r[4][first:]) for r in records)
        outputs = sum(np.array(r[5]) * logits[r[0]] for r in records)
        inputs = inputs / inputs.sum()
        return inputs / np.linalg.norm(inputs), outputs / np.linalg.norm(outputs)

    for first, keep_first_position in ((1, False), (0, True)):
        views = {("A", 0): raw_views([a1, a2], first), ("A", 1): raw_views([a3], first),
                 ("B", 0): raw_views([b1], first), ("B", 1): raw_views([b2], first), ("C", 0): raw_views([c1], first)}
        a_b_in = (views["A", 0][0] @ views["B", 0][0] + views["A", 1][0] @ views["B", 1][0]) / 2
        a_b_out = (views["A", 0][1] @ views["B", 0][1] + views["A", 1][1] @ views["B", 1][1]) / 2
        a_c_in, a_c_out = views["A", 0][0] @ views["C", 0][0], views["A", 0][1] @ views["C", 0][1]
        b_c_in, b_c_out = views["B", 0][0] @ views["C", 0][0], views["B", 0][1] @ views["C", 0][1]
        assert a_c_out < 0 < a_c_in  # the case the clamp exists for

        profiles = half_neuron_profiles(nodes, prompts, keep_first_position=keep_first_position)
        a, b, c = _index(profiles, 0, 1, 1), _index(profiles, 1, 2, 1), _index(profiles, 1, 2, -1)
        s = similarity(profiles)
        assert s[a, b] == pytest.approx(_harmonic(a_b_in, a_b_out), rel=FLOAT32)
        assert s[a, c] == 0  # negative output cosine clamped to 0
        assert s[b, c] == pytest.approx(_harmonic(b_c_in, b_c_out), rel=FLOAT32)
        assert np.allclose(np.diag(s), 1, rtol=FLOAT32) and np.array_equal(s, s.T)
        assert similarity(profiles, "input")[a, b] == pytest.approx(a_b_in, rel=FLOAT32)
        assert similarity(profiles, "output")[a, c] == pytest.approx(a_c_out, rel=FLOAT32)

    # views="share": the stored shares over every position, position 0 included (the old behaviour).
    share_in = [np.array(a1[4]) + np.array(a2[4]), np.array(c1[4])]
    share_out = [np.array(a1[5]) + np.array(a2[5]), np.array(c1[5])]
    profiles = half_neuron_profiles(nodes, prompts, "share")
    a, c = _index(profiles, 0, 1, 1), _index(profiles, 1, 2, -1)
    assert similarity(profiles, "input")[a, c] == pytest.approx(_cos(*share_in), rel=FLOAT32)
    assert similarity(profiles, "output")[a, c] == pytest.approx(_cos(*share_out), rel=FLOAT32)


def test_average_over_co_occurring_prompts_and_sum_over_positions():
    records = [
        (0, 0, 1, 1.0, [0.0, 1.0, 0.0], [1.0, 0.0]), (0, 0, 2, 1.0, [0.0, 1.0, 0.0], [1.0, 0.0]),
        (1, 0, 1, 1.0, [0.0, 1.0, 0.0, 0.0], [1.0, 0.0]), (1, 0, 2, 1.0, [0.0, 0.0, 0.0, 1.0], [0.0, 1.0]),
        (1, 0, 2, 1.0, [0.0, 0.0, 1.0, 0.0], [0.0, 1.0]),  # a second position of the same half-neuron
        (2, 0, 2, 1.0, [0.0, 1.0], [1.0, 0.0]),             # only one of the two occurs here
    ]
    nodes, prompts = _tables(records, [3, 4, 2])
    s = similarity(half_neuron_profiles(nodes, prompts))
    # prompt 0: both views 1; prompt 1: input cos 0, output cos 0 -> each view averages to 0.5
    assert s[0, 1] == pytest.approx(0.5, rel=FLOAT32)


def test_input_view_is_divided_by_its_sum_first():
    records = [(0, 0, 1, 1.0, [0.0, 1.0, 2.0], [1.0, 0.0]), (0, 0, 2, 1.0, [0.0, -1.0, -2.0], [1.0, 0.0])]
    nodes, prompts = _tables(records, [3])
    s = similarity(half_neuron_profiles(nodes, prompts), "input")
    assert s[0, 1] == pytest.approx(1.0, rel=FLOAT32)  # same shape once normalised by the (negative) sum


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
    records = [(0, 0, 1, 1.0, [0.0, 1.0, 1.0], [0.0, 0.0]), (0, 0, 2, 1.0, [0.0, 1.0, 0.0], [0.0, 0.0])]
    nodes, prompts = _tables(records, [3])
    s = similarity(half_neuron_profiles(nodes, prompts))
    assert s[0, 1] == pytest.approx(_cos([0.5, 0.5], [1.0, 0.0]), rel=FLOAT32)


def _numpy_spectral(s, k, seed):
    """DESIGN.md section 7's steps, written out with numpy."""
    a = np.maximum(s, 0)
    np.fill_diagonal(a, 1)
    d = a.sum(1)
    n = a / np.sqrt(d)[:, None] / np.sqrt(d)[None, :]
    np.fill_diagonal(n, 1)
    values, vectors = np.linalg.eigh(n)
    top = np.argsort(values)[::-1][:k]
    embedding = vectors[:, top] / np.linalg.norm(vectors[:, top], axis=1, keepdims=True)
    return values[top], vectors[:, top], KMeans(k, n_init=10, random_state=seed).fit_predict(embedding)


def _planted_similarity(n, k, seed):
    """A random symmetric matrix with k blocks of higher similarity, negative entries included."""
    rng = np.random.default_rng(seed)
    groups = rng.integers(0, k, n)
    noise = rng.normal(scale=0.3, size=(n, n))
    return 0.5 * (groups[:, None] == groups[None, :]) + (noise + noise.T) / 2


def test_spectral_steps_match_numpy():
    s, k = _planted_similarity(80, 5, seed=1), 5
    values, vectors, labels = _numpy_spectral(s, k, seed=3)
    normalised = spectral.normalised_affinity(spectral.reference_affinity(s))
    ours_values, ours_vectors = spectral.top_eigenvectors(normalised, k, seed=3)
    # float64 eigensolvers on an 80 x 80 matrix of norm ~2: differences ~ n * eps64 * 2 ~ 4e-14.
    np.testing.assert_allclose(ours_values, values, atol=1e-10)
    np.testing.assert_allclose(np.abs(ours_vectors.T @ vectors), np.eye(k), atol=1e-8)  # equal up to sign
    assert adjusted_rand_score(spectral.embedding_labels(ours_vectors, k, seed=3), labels) == 1.0


def test_profile_clustering_is_the_reference_algorithm_on_its_similarity():
    nodes, prompts, _ = planted_tables([(0, 0), (3, 1), (6, 2), (9, 3)], per_group=15, n_prompts=30, noise=0.8)
    profiles = half_neuron_profiles(nodes, prompts)
    model = ProfileClustering(4).fit(profiles)
    s = similarity(profiles).astype(np.float64)
    values, _, labels = _numpy_spectral(s, 4, seed=0)
    assert adjusted_rand_score(model.labels_, labels) == 1.0
    np.testing.assert_allclose(model.eigenvalues_[:4], values, atol=1e-8)

    # The diagnostics read the same matrices: silhouette on the distance 1 - A, eigengap on N's spectrum.
    a = np.maximum(s, 0)
    np.fill_diagonal(a, 1)
    distance = 1 - a
    np.fill_diagonal(distance, 0)
    expected = silhouette_score(distance, model.labels_, metric="precomputed")
    assert model.diagnostics_["silhouette"] == pytest.approx(expected, abs=1e-12)
    d = a.sum(1)
    n = a / np.sqrt(d)[:, None] / np.sqrt(d)[None, :]
    np.fill_diagonal(n, 1)
    spectrum = np.sort(np.linalg.eigvalsh(n))[::-1][:model.max_clusters + 1]
    gaps = {k: spectrum[k - 1] - spectrum[k] for k in range(2, len(spectrum))}
    assert model.suggested_k_ == max(gaps, key=gaps.get)


def test_sparse_similarity_keeps_the_nearest_neighbours():
    nodes, prompts, _ = planted_tables([(0, 0), (3, 1), (6, 2)], per_group=20, n_prompts=30, noise=0.5)
    profiles = half_neuron_profiles(nodes, prompts)
    dense = similarity(profiles)
    knn = knn_similarity(profiles, neighbors=7, strip_entries=500, column_blocks=3).toarray()  # 8-row strips
    kept = knn != 0
    np.testing.assert_array_equal(knn[kept], dense[kept])
    assert np.array_equal(knn, knn.T) and not kept.diagonal().any()
    off = np.where(np.eye(len(dense), dtype=bool), -np.inf, dense)
    seventh = np.sort(off, axis=1)[:, -7]
    chosen = off >= seventh[:, None]
    assert (kept | ~chosen | (dense <= 0)).all()  # every row's 7 largest positive entries are kept


def test_sparse_and_dense_clustering_agree_on_planted_groups():
    groups = [(g % 8, g) for g in range(6)]
    nodes, prompts, truth = planted_tables(groups, per_group=40, n_prompts=120, occurrence=0.1, noise=0.5)
    profiles = half_neuron_profiles(nodes, prompts)
    dense = ProfileClustering(6).fit(profiles)
    sparse = ProfileClustering(6, dense_limit=100, neighbors=20).fit(profiles)
    assert sp.issparse(sparse.affinity_) and not sp.issparse(dense.affinity_)
    assert adjusted_rand_score(dense.labels_, sparse.labels_) >= 0.95
    assert _ari(profiles, truth, sparse.labels_) >= 0.9
    assert sparse.diagnostics_["similarity"].startswith("sparse") and sparse.diagnostics_["silhouette"] > 0


def test_diagnostics_equal_their_definitions_on_dense_and_sparse_affinity():
    rng = np.random.default_rng(0)
    a = np.clip(spectral.reference_affinity(_planted_similarity(50, 4, seed=2)), 0, 1)  # similarities are at most 1
    a[rng.random(a.shape) < 0.5] = 0  # sparse-like, kept symmetric below
    a = np.minimum(a, a.T)
    np.fill_diagonal(a, 1)
    labels = rng.integers(0, 4, 50)
    distance = 1 - a
    np.fill_diagonal(distance, 0)
    expected = silhouette_score(distance, labels, metric="precomputed")
    same, off = labels[:, None] == labels[None, :], ~np.eye(50, dtype=bool)
    ratio = a[same & off].mean() / a[~same].mean()
    for matrix in (a, sp.csr_matrix(a)):
        assert spectral.silhouette(matrix, labels) == pytest.approx(expected, abs=1e-12)
        assert spectral.intra_inter_ratio(matrix, labels) == pytest.approx(ratio, rel=1e-12)


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


@pytest.mark.parametrize(("method", "embedding"), [("spectral", "reference"), ("spectral", "sklearn"),
                                                   ("agglomerative", "reference"), ("kmeans", "reference"),
                                                   ("leiden", "reference")])
def test_methods_are_deterministic_and_find_planted_groups(method, embedding):
    nodes, prompts, truth = planted_tables([(0, 0), (3, 1), (6, 2)], per_group=20, n_prompts=40, noise=0.3)
    profiles = half_neuron_profiles(nodes, prompts)
    first = ProfileClustering(3, method=method, embedding=embedding).fit(profiles).labels_
    second = ProfileClustering(3, method=method, embedding=embedding).fit(profiles).labels_
    assert np.array_equal(first, second)
    assert _ari(profiles, truth, first) >= 0.9


def test_cluster_graph_uses_direct_edges_of_each_kind():
    nodes = pd.DataFrame({"prompt": [0, 0, 0], "node": [0, 1, 2], "attribution": [1.0, 2.0, 4.0]})
    edges = pd.DataFrame({
        "prompt": [0] * 6,
        "source_kind": ["embedding", "embedding", "embedding", "neuron", "neuron", "neuron"],
        "source": [3, 3, 1, 0, 0, 2],
        "target_kind": ["neuron", "neuron", "logit", "neuron", "neuron", "logit"],
        "target": [0, 2, 0, 1, 2, 1],
        "weight": [0.1] * 6,
        "attribution": [0.5, 0.25, 8.0, 0.125, 1.0, 2.0],
    })
    tables = cluster_graph(nodes, edges, np.array([0, 0, 1]), n_prompts=1)
    inputs = tables["input_attachments"].set_index(["cluster", "position"])["attribution"]
    assert inputs.to_dict() == {(0, 3): 0.5, (1, 3): 0.25}  # the embedding -> logit edge is no attachment
    logits = tables["logit_attachments"]
    assert logits[["cluster", "target_rank", "attribution"]].values.tolist() == [[1, 1, 2.0]]
    assert tables["cluster_edges"][["source_cluster", "target_cluster", "attribution"]].values.tolist() == [
        [0, 1, 1.0]]  # the 0 -> 1 edge stays inside cluster 0


def test_cluster_stage_on_a_traced_run(clustered_run):
    run = cluster_run(str(clustered_run), ClusterConfig(k=4)).run
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
    again = cluster_run(str(clustered_run), ClusterConfig(k=4)).run
    pd.testing.assert_frame_equal(half, again.read_table("cluster", "half_neurons"))
    old = cluster_run(str(clustered_run), ClusterConfig(k=4, views="share", embedding="sklearn")).run
    assert old.read_json("cluster", "diagnostics")["embedding"] == "sklearn"


def test_cli_k_above_the_half_neurons_is_refused_before_any_eigensolve(clustered_run, monkeypatch):
    view = RunView.open(clustered_run)
    n = len(half_neuron_profiles(view.nodes, view.prompts))
    before = snapshot(clustered_run)

    def no_clustering(*args, **kwargs):
        raise AssertionError("similarity and eigensolve must not run for an impossible k")

    monkeypatch.setattr(ProfileClustering, "fit", no_clustering)
    result = CliRunner().invoke(app, ["cluster", str(clustered_run), "--k", "100000"])
    error_line(result, match=f"--k 100000 is more than the {n} half-neurons")
    assert snapshot(clustered_run) == before


@pytest.mark.parametrize("k", [0, 1, -3])
def test_k_below_two_is_refused(k):
    with pytest.raises(ValidationError):
        ClusterConfig(k=k)
    assert ClusterConfig(k="auto").k == "auto"


def test_cluster_needs_a_trace(tmp_path):
    RunDir.create(tmp_path, {"spec": "m"}, {"name": "d"})
    with pytest.raises(AdagError, match="no finished 'trace' stage"):
        cluster_run(str(tmp_path), ClusterConfig())
