import numpy as np
import pandas as pd
import pytest
import torch

from adag.cluster import ClusterConfig, cluster_run
from adag.datasets import load_dataset
from adag.steer import FaithfulnessConfig, SteerConfig, correlate, faithfulness_run, replaced, scaled, steer_run
from adag.steer.evaluate import faithfulness_curve
from adag.trace import PromptBatch, TraceConfig, trace_dataset
from adag.trace.tap import NeuronTap


def _inputs(lm):
    tokens = [lm.tokenizer(t)["input_ids"] for t in ["What is the capital of France? Answer:", "What is 3 + 4?"]]
    batch = PromptBatch.left_pad(tokens, [[], []], 0, torch.device("cpu"))
    return dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids)


def _hook_count(model):
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


@torch.no_grad()
def test_multiplier_one_is_identity_and_zero_matches_a_hand_written_hook(tiny):
    inputs = _inputs(tiny)
    plain = tiny.model(**inputs).logits
    before = _hook_count(tiny.model)
    half = [(1, 3, 1), (1, 3, -1), (0, 5, 1), (0, 5, -1)]  # both polarities: the whole neuron
    with scaled(tiny.model, tiny.adapter, half, 1.0):
        assert torch.equal(tiny.model(**inputs).logits, plain)
    with scaled(tiny.model, tiny.adapter, half, 0.0):
        ablated = tiny.model(**inputs).logits

    def zero(neuron):
        def hook(_m, args):
            a = args[0].clone()
            a[..., neuron] = 0
            return (a,)
        return hook

    layers = tiny.adapter.layer_list(tiny.model)
    handles = [layers[1].get_submodule(tiny.adapter.mlp_out).register_forward_pre_hook(zero(3)),
               layers[0].get_submodule(tiny.adapter.mlp_out).register_forward_pre_hook(zero(5))]
    try:
        by_hand = tiny.model(**inputs).logits
    finally:
        for handle in handles:
            handle.remove()
    assert torch.equal(ablated, by_hand)
    assert not torch.equal(ablated, plain)
    assert _hook_count(tiny.model) == before
    assert torch.equal(tiny.model(**inputs).logits, plain)


@torch.no_grad()
def test_a_tap_entered_while_steering_reads_the_steered_values(tiny):
    """Steering and the tap go through one installer: hooks installed inside run after the outer ones."""
    inputs = _inputs(tiny)
    before = _hook_count(tiny.model)
    with NeuronTap(tiny.model, tiny.adapter) as plain:
        tiny.model(**inputs)
    assert (plain.activations[0][..., 5] != 0).any()
    with scaled(tiny.model, tiny.adapter, [(0, 5, 1), (0, 5, -1)], 0.0), NeuronTap(tiny.model, tiny.adapter) as tap:
        tiny.model(**inputs)
        with pytest.raises(RuntimeError), NeuronTap(tiny.model, tiny.adapter):
            raise RuntimeError("an error inside leaves the outer hooks in place")
        assert _hook_count(tiny.model) > before
    assert (tap.activations[0][..., 5] == 0).all()
    assert torch.equal(tap.activations[0][..., :5], plain.activations[0][..., :5])
    assert _hook_count(tiny.model) == before


@torch.no_grad()
def test_polarity_and_positions(tiny_models):
    lm = tiny_models["llama"]
    inputs = _inputs(lm)
    seen = {}
    layer = lm.adapter.layer_list(lm.model)[0].get_submodule(lm.adapter.mlp_out)
    handle = layer.register_forward_pre_hook(lambda _m, args: seen.__setitem__("a", args[0].clone()))
    try:
        lm.model(**inputs)
        original = seen["a"][..., 7].clone()
        where = torch.zeros(inputs["input_ids"].shape, dtype=torch.bool)
        where[:, -1] = True
        with scaled(lm.model, lm.adapter, [(0, 7, 1)], 3.0, positions=where):
            lm.model(**inputs)
    finally:
        handle.remove()
    steered = seen["a"][..., 7]
    expected = original.clone()
    expected[:, -1] = torch.where(original[:, -1] > 0, 3 * original[:, -1], original[:, -1])
    assert torch.equal(steered, expected)


@torch.no_grad()
def test_replaced_keeping_everything_is_identity(tiny_models):
    lm = tiny_models["gpt2"]
    inputs = _inputs(lm)
    plain = lm.model(**inputs).logits
    keep = {layer: torch.ones((*inputs["input_ids"].shape, lm.n_neurons), dtype=torch.bool)
            for layer in range(lm.n_layers)}
    with replaced(lm.model, lm.adapter, keep, {layer: torch.zeros(()) for layer in keep}):
        assert torch.equal(lm.model(**inputs).logits, plain)


def test_correlation_known_answers():
    prompts = pd.Index(range(8))
    values = pd.Series(np.arange(8, dtype=float), index=prompts)
    rows = [{"prompt": p, "cluster": 0, "attribution": 2.0 * p + 1} for p in prompts]       # linear
    rows += [{"prompt": p, "cluster": 1, "attribution": float(p) ** 3} for p in prompts]     # monotone
    rows += [{"prompt": p, "cluster": 2, "attribution": 1.0} for p in prompts if p % 2]      # absent -> 0
    table = correlate(pd.DataFrame(rows), values).set_index("cluster")
    assert table.loc[0, "pearson"] == pytest.approx(1.0) and table.loc[0, "pearson_p"] < 1e-6
    assert table.loc[1, "spearman"] == pytest.approx(1.0) and table.loc[1, "pearson"] < 0.99
    expected = np.corrcoef(np.array([p % 2 for p in prompts], float), values)[0, 1]
    assert table.loc[2, "pearson"] == pytest.approx(expected)


def test_faithfulness_formula_known_answer():
    values = {None: 10.0, 0.0: 2.0, 0.5: 8.0, 1.0: 9.0}
    complement = {0.0: 10.0, 0.5: 4.0, 1.0: 2.5}
    curve = faithfulness_curve([0.0, 0.5, 1.0], lambda f, c: complement[f] if c else values[f])
    assert curve["faithfulness"].tolist() == pytest.approx([0.0, 0.75, 0.875])
    assert curve["completeness"].tolist() == pytest.approx([1.0, 0.25, 0.0625])


@pytest.fixture(scope="module")
def steered_run(tiny_models, tmp_path_factory):
    path = tmp_path_factory.mktemp("run")
    lm = tiny_models["qwen3"]
    trace_dataset(lm, load_dataset("country-capitals", limit=6), TraceConfig(threshold=0.03), path, progress=False)
    cluster_run(str(path), ClusterConfig(k=3))
    return lm, path


def test_faithfulness_run_endpoints(steered_run):
    lm, path = steered_run
    for ablation in ("zero", "mean"):
        config = FaithfulnessConfig(fractions=[0.0, 0.5, 1.0], ablation=ablation)
        curve = faithfulness_run(str(path), config, lm=lm).table.set_index("fraction")
        assert curve.loc[0.0, "faithfulness"] == pytest.approx(0.0)
        assert curve.loc[0.0, "completeness"] == pytest.approx(1.0)
        assert np.isfinite(curve["faithfulness"]).all()


def test_steer_sweep_with_controls(steered_run):
    lm, path = steered_run
    run = steer_run(str(path), SteerConfig(multipliers=[0, 1, 2], controls=5, positions="traced"), lm=lm,
                    progress=False).run
    summary = run.read_table("steer", "summary")
    assert set(summary["multiplier"]) == {0, 1, 2} and set(summary["cluster"]) == {0, 1, 2}
    identity = summary[summary["multiplier"] == 1]
    assert np.allclose(identity["kl"], 0, atol=1e-6) and np.allclose(identity["logit_change"], 0, atol=1e-6)
    results = run.read_table("steer", "results")
    assert len(results) == 3 * 3 * 6 and len(results["top_tokens"].iloc[0]) == 5
    controls = run.read_table("steer", "controls")
    assert ((controls["percentile"] >= 0) & (controls["percentile"] <= 100)).all()
    assert (path / "steer" / "plots" / "overview.png").stat().st_size > 1000
    assert (path / "steer" / "plots" / "cluster-000.png").exists()


def test_generation_under_steering_and_judge_rate(steered_run, tmp_path):
    from adag.llm import CachedBackend, OpenAIBackend
    from adag.steer.judge import generate, judge_rate
    from adag.view import RunView
    from tests.fake_openai import FakeOpenAI, reply_body

    lm, path = steered_run
    view = RunView.open(path)
    prompts = view.prompts.head(2)
    members = view.cluster_members[0]
    plain = generate(lm, prompts, samples=2, max_new_tokens=6, seed=0)
    again = generate(lm, prompts, samples=2, max_new_tokens=6, seed=0)
    ablated = generate(lm, prompts, samples=2, max_new_tokens=6, seed=0,
                       intervention=scaled(lm.model, lm.adapter, members, 0.0))
    assert len(plain) == 4 and plain == again and [p for p, _ in plain] == [p for p, _ in ablated]
    answers = [reply_body("Yes."), reply_body("no"), reply_body("Maybe"), reply_body("yes")]
    with FakeOpenAI([(200, a) for a in answers]) as server:
        judge = CachedBackend(OpenAIBackend("fake", base_url=server.url), tmp_path / "cache.sqlite")
        rate = judge_rate(judge, "Is it about a capital?", [t for _, t in plain])
        asked = server.requests[0]["messages"][0]["content"]
    assert rate == {"yes": 2, "no": 1, "unclear": 1, "rate": pytest.approx(2 / 3)}
    assert "Is it about a capital?" in asked
