import os
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch

from adag.datasets import PromptRow, encode_prompt, load_dataset
from adag.errors import AdagError
from adag.store import RunDir
from adag.trace import (
    PromptBatch,
    TraceConfig,
    edges_pass,
    linearised,
    node_scores,
    profiles_pass,
    select_nodes,
    trace_dataset,
)
from adag.trace.attribute import BatchAttribution
from adag.trace.edges import EMBEDDING, LOGIT, NEURON
from adag.trace.passes import linearised_pass
from adag.trace.rules import RULE_SETS
from adag.trace.tables import batch_tables
from tests.explicit import ExplicitLinearModel
from tests.tiny import FAMILIES

# Tolerances. The reference tests (explicit linear model, conservation, batch invariance) run in
# float64 on every family: float64 rounding over these depths (3 layers, sums of <= 96 terms) is
# ~1e-13 relative, so 1e-5 (explicit model), 1e-4 (conservation) and 1e-6 (batch invariance) hold for
# any summation order (thread count, CPU, BLAS kernel). They test the method, not rounding.
# Exact comparisons (torch.equal) are kept only where the two sides are bit-identical by
# construction: a rule's hook adds exactly zero to the forward value.

PROMPTS = ["What is the capital of France? Answer:", "What is 3 + 4?", "the state containing Dallas"]


def _batch(lm, texts=PROMPTS[:2]):
    tokens = [lm.tokenizer(t)["input_ids"] for t in texts]
    return PromptBatch.left_pad(tokens, [[] for _ in texts], 0, torch.device("cpu"))


@pytest.mark.parametrize("rules", list(RULE_SETS))
def test_logits_under_rules_equal_plain_logits_in_a_padded_batch(tiny, rules):
    batch = _batch(tiny, PROMPTS)
    inputs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids)
    with torch.no_grad():
        plain = tiny.model(**inputs).logits
    with torch.enable_grad(), linearised(tiny.model, tiny.adapter, rules):
        ruled = tiny.model(**inputs).logits
    assert torch.equal(plain, ruled)
    assert not torch.isnan(plain[batch.valid]).any()


def test_rules_are_removed_on_exit_and_on_error(tiny):
    def count():
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in tiny.model.modules())

    before = count()
    with linearised(tiny.model, tiny.adapter, "half"):
        assert count() > before
    assert count() == before
    with pytest.raises(ValueError), linearised(tiny.model, tiny.adapter, "half"):
        raise ValueError("boom")
    assert count() == before


def test_rule_hooks_run_before_a_hook_registered_earlier_on_the_same_module(tiny):
    """A reader of the neuron activations registered before the rules still sees the half rule's rewrite:
    the rules' order is explicit (prepend), not an accident of registration order."""
    mlp_out = tiny.adapter.layer_list(tiny.model)[0].get_submodule(tiny.adapter.mlp_out)
    seen, received = [], []
    competing = mlp_out.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    after = mlp_out.register_forward_hook(lambda _m, args, _out: received.append(args[0]))
    try:
        with torch.enable_grad(), linearised(tiny.model, tiny.adapter, "half"):
            tiny.model(input_ids=_batch(tiny).input_ids)
    finally:
        competing.remove()
        after.remove()
    assert seen[0] is received[0]


def test_swapping_the_activation_and_half_rule_order_breaks_conservation(float64_models, monkeypatch):
    """The half rule keeps the gate factor from the activation's output, so its hook must run after
    the activation rule's. Listing it first (the only change) keeps the logits but breaks conservation."""
    lm = float64_models["llama"]  # gated, and no biases: conservation is exact without bias shares
    batch = _batch(lm, PROMPTS)

    def gap() -> float:
        linear_pass = linearised_pass(lm, TraceConfig(), batch)
        (grad,) = torch.autograd.grad(linear_pass.metric.sum(), [linear_pass.tap.embeddings])
        relevance = (grad * linear_pass.tap.embeddings).sum((1, 2))
        metric = linear_pass.metric.detach()
        return float(((relevance.detach() - metric) / metric).abs().max())

    assert gap() < 1e-4  # the tolerance of test_conservation_with_half_rule
    norm, attention, activation, half = RULE_SETS["half"]
    monkeypatch.setitem(RULE_SETS, "half", (norm, attention, half, activation))
    swapped = gap()
    assert swapped > 1e-2


def _bias_share(lm, prompt: str) -> torch.Tensor:
    """sum over biases of bias * dm/dbias for one prompt traced alone (a bias is shared by a batch)."""
    biases = [p for name, p in lm.model.named_parameters() if name.endswith("bias")]
    if not biases:
        return torch.zeros((), dtype=torch.float64)
    for p in biases:
        p.requires_grad_(True)
    try:
        linear_pass = linearised_pass(lm, TraceConfig(), _batch(lm, [prompt]))
        grads = torch.autograd.grad(linear_pass.metric.sum(), biases, allow_unused=True)
    finally:
        for p in biases:
            p.requires_grad_(False)
    return sum((g * p).sum() for g, p in zip(grads, biases) if g is not None).double()


def test_conservation_with_half_rule(tiny64):
    """In a padded batch, summed embedding relevance plus each bias's share recovers the metric."""
    lm = tiny64
    linear_pass = linearised_pass(lm, TraceConfig(), _batch(lm, PROMPTS))
    (grad,) = torch.autograd.grad(linear_pass.metric.sum(), [linear_pass.tap.embeddings])
    shares = torch.stack([_bias_share(lm, p) for p in PROMPTS])
    relevance = (grad * linear_pass.tap.embeddings).sum((1, 2)) + shares
    torch.testing.assert_close(relevance.double(), linear_pass.metric.detach().double(), rtol=1e-4, atol=0)


def test_conservation_fails_without_half_rule(tiny_models):
    lm = tiny_models["llama"]
    batch = _batch(lm)
    linear_pass = linearised_pass(lm, TraceConfig(rules="no_half"), batch)
    (grad,) = torch.autograd.grad(linear_pass.metric.sum(), [linear_pass.tap.embeddings])
    relevance = (grad * linear_pass.tap.embeddings).sum((1, 2))
    assert not torch.allclose(relevance, linear_pass.metric, rtol=1e-2)


@pytest.mark.parametrize("family", FAMILIES)
def test_attributions_and_profiles_match_explicit_linear_model(float64_models, family):
    lm = float64_models[family]
    batch = _batch(lm)
    config = TraceConfig(aggregation="none", threshold=0.01, input_profiles="forward")
    scores, _ = node_scores(lm, config, batch)
    nodes = select_nodes(scores, config)
    result = profiles_pass(lm, config, batch, nodes)
    explicit = ExplicitLinearModel(lm, batch.input_ids, batch.attention_mask, batch.position_ids)
    base_logits, base_acts = explicit.forward()
    targets = result.targets.ids
    base_target = base_logits.gather(-1, targets)
    torch.testing.assert_close(base_target, result.target_logits, rtol=1e-6, atol=1e-6)

    picks = torch.linspace(0, len(nodes) - 1, min(12, len(nodes))).long().tolist()
    for i in picks:
        node = (int(nodes.layer[i]), int(nodes.row[i]), int(nodes.position[i]), int(nodes.neuron[i]))
        logits, _ = explicit.forward(zero_neuron=node)
        delta = (base_target - logits.gather(-1, targets))[node[1]]  # a_n * dlogit_i/da_n, exactly (affine)
        relp = (delta * result.targets.coeffs[node[1]]).sum()
        torch.testing.assert_close(result.attribution[i].double(), relp.double(), rtol=1e-5,
                                   atol=1e-6 * abs(relp.item()))
        torch.testing.assert_close(result.output_profile[i].double(), (delta / base_target[node[1]]).double(),
                                   rtol=1e-5, atol=1e-6)

    # Input profiles and embedding relevance: ablate each embedding position of each prompt once.
    coeffs = result.targets.coeffs.double()
    for row in range(batch.input_ids.shape[0]):
        for position in range(int(batch.offsets[row]), batch.input_ids.shape[1]):
            logits, acts = explicit.forward(zero_embedding=(row, position))
            relevance = ((base_target - logits.gather(-1, targets))[row] * coeffs[row]).sum()
            assert abs(result.embedding_relevance[row, position] - relevance) <= 1e-5 * max(1, abs(relevance))
            for i in (nodes.row == row).nonzero(as_tuple=True)[0].tolist():
                layer, pos, neuron = int(nodes.layer[i]), int(nodes.position[i]), int(nodes.neuron[i])
                a = base_acts[layer][row, pos, neuron]
                expected = (a - acts[layer][row, pos, neuron]) / a
                assert abs(result.input_profile[i, position].item() - expected.item()) <= 1e-5 * max(1, abs(expected))


@pytest.mark.parametrize("profiles", ["total", "direct"])
def test_forward_mode_and_vjp_input_profiles_agree(tiny64, profiles):
    batch = _batch(tiny64, PROMPTS)
    config = TraceConfig(aggregation="none", threshold=0.01, profiles=profiles)
    nodes = select_nodes(node_scores(tiny64, config, batch)[0], config)
    forward = profiles_pass(tiny64, config.model_copy(update={"input_profiles": "forward"}), batch, nodes)
    vjp = profiles_pass(tiny64, config.model_copy(update={"input_profiles": "vjp", "chunk_size": 3}), batch, nodes)
    assert forward.input_profile_mode == "forward" and vjp.input_profile_mode == "vjp" and len(nodes) > 3
    torch.testing.assert_close(forward.input_profile, vjp.input_profile, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(forward.attribution, vjp.attribution, rtol=0, atol=0)


def test_batched_passes_take_the_rows_the_working_memory_budget_holds(tiny_models, monkeypatch):
    """The one chunking rule: every batched backward pass (node VJPs) takes at most budget //
    bytes-per-row rows and every tangent pass at most what `row_bytes` says its window holds, so a
    trace's peak beyond the weights and one forward pass follows --working-memory-mib; a smaller budget
    means more, smaller passes and the same results."""
    from adag.trace import passes, tangent

    lm = tiny_models["llama"]
    batch = _batch(lm, PROMPTS)
    config = TraceConfig(aggregation="none", threshold=0.01, input_profiles="forward")
    nodes = select_nodes(node_scores(lm, config, batch)[0], config)
    rows_seen: list[tuple[str, int, int]] = []  # (pass, rows taken, rows the rule allows)
    rule, grad, push = passes.rows_per_pass, torch.autograd.grad, tangent.push_forward
    allowed: list[int] = []

    def counted_rule(config, device, bytes_per_row):
        allowed.append(passes.working_memory(config, device) // bytes_per_row)
        return rule(config, device, bytes_per_row)

    def counted_grad(outputs, inputs, grad_outputs=None, is_grads_batched=False, **kwargs):
        if is_grads_batched and grad_outputs.ndim == 2:  # node VJPs: (rows, nodes); logit VJPs are 3-D
            rows_seen.append(("vjp", grad_outputs.shape[0], allowed[-1]))
        return grad(outputs, inputs, grad_outputs, is_grads_batched=is_grads_batched, **kwargs)

    def counted_push(lm, base, window, injections, reads, cut=False):
        window_bytes = tangent.row_bytes(lm, base, batch.input_ids.shape[1] - window.start, cut)
        rows_seen.append(("tangent", window.sources, passes.working_memory(budget, lm.device) // window_bytes))
        return push(lm, base, window, injections, reads, cut)

    monkeypatch.setattr(passes, "rows_per_pass", counted_rule)
    monkeypatch.setattr(tangent, "rows_per_pass", counted_rule)
    monkeypatch.setattr(torch.autograd, "grad", counted_grad)
    for module in ("profiles", "edges"):
        monkeypatch.setattr(f"adag.trace.{module}.push_forward", counted_push)
    results = {}
    for mib in (1, 4):
        rows_seen.clear()
        budget = config.model_copy(update={"working_memory_mib": mib})
        profiles = profiles_pass(lm, budget, batch, nodes)
        edges = edges_pass(lm, budget, batch, profiles)
        by_vjp = edges_pass(lm, budget, batch, profiles, method="vjp")
        results[mib] = (profiles, edges, by_vjp, list(rows_seen))
        assert {kind for kind, _, _ in rows_seen} == {"vjp", "tangent"}
        assert all(0 < rows <= max(1, limit) for _, rows, limit in rows_seen), rows_seen
    small, large = results[1][3], results[4][3]
    assert len(small) > len(large) and any(rows == limit > 1 for _, rows, limit in small)  # the budget binds
    torch.testing.assert_close(results[1][0].input_profile, results[4][0].input_profile, rtol=1e-5, atol=1e-6)
    for edges in (1, 2):
        torch.testing.assert_close(results[1][edges].weight, results[4][edges].weight, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("profiles", ["total", "direct"])
def test_windowed_tangent_passes_equal_full_width_ones(tiny64, profiles, monkeypatch):
    """A pass per window (each source position its own window, attending within it and scaled by each
    query's share of attention inside it) gives the input profiles and edges of one pass over every
    position. One prompt is longer than Gemma's sliding-window layers (8 positions here)."""
    from adag.trace import tangent

    batch = _batch(tiny64, ["What is 3 + 4?", "Paris is in", "the state of Texas is a large state in the south"])
    config = TraceConfig(aggregation="none", threshold=0.01, input_profiles="forward", profiles=profiles)
    nodes = select_nodes(node_scores(tiny64, config, batch)[0], config)
    starts: list[int] = []
    push = tangent.push_forward

    def recorded(lm, base, window, *args, **kwargs):
        starts.append(window.start)
        return push(lm, base, window, *args, **kwargs)

    for module in ("profiles", "edges"):
        monkeypatch.setattr(f"adag.trace.{module}.push_forward", recorded)
    monkeypatch.setattr(tangent, "PASS_COST_IN_ROWS", 0)
    windowed = profiles_pass(tiny64, config, batch, nodes)
    windowed_edges = _edge_weights(edges_pass(tiny64, config, batch, windowed))
    assert len(set(starts)) > 2 and max(starts) > 8 and batch.input_ids.shape[1] > 8
    starts.clear()
    plan = tangent.plan_windows
    for module in ("profiles", "edges"):  # the same passes, over every position
        monkeypatch.setattr(f"adag.trace.{module}.plan_windows",
                            lambda *args, **kwargs: [replace(window, start=0, inside=None)
                                                     for window in plan(*args, **kwargs)])
    full = profiles_pass(tiny64, config, batch, nodes)
    full_edges = _edge_weights(edges_pass(tiny64, config, batch, full))
    assert set(starts) == {0}
    tolerance, floor = _window_rounding(tiny64, float(full.input_profile.abs().max()))
    torch.testing.assert_close(windowed.input_profile, full.input_profile, rtol=tolerance, atol=tolerance * floor)
    assert windowed_edges.keys() == full_edges.keys() and len(full_edges) > 10
    tolerance, floor = _window_rounding(tiny64, max(abs(weight) for weight in full_edges.values()))
    for key, weight in full_edges.items():
        assert abs(windowed_edges[key] - weight) <= tolerance * max(abs(weight), floor)


def test_rows_enter_at_their_sources_layer(tiny64):
    """A cut tangent pass runs each layer on the slots whose first source lies at or below it (sorted by
    layer, in any order given) and reads what it reads when every slot runs through every layer (forced
    here by a zero source on every slot's input), in the caller's slot order."""
    from adag.trace.passes import node_readouts, readouts_by_layer
    from adag.trace.tangent import Injections, Reads, Window, push_forward

    batch = _batch(tiny64)
    config = TraceConfig(aggregation="none", threshold=0.01, input_profiles="forward")
    nodes = select_nodes(node_scores(tiny64, config, batch)[0], config)
    base = profiles_pass(tiny64, config, batch, nodes).base
    reads = Reads(nodes.by_layer(), readouts_by_layer(node_readouts(tiny64, config, base.linear_pass, nodes), nodes),
                  base.logit_readouts(tiny64))
    generator = torch.Generator().manual_seed(0)
    top, d_model, prompts, width = tiny64.n_layers - 1, tiny64.model.config.hidden_size, *batch.input_ids.shape
    slots = 4
    slot = torch.tensor([2, 0, 3, 1, 0, 2])  # slot 2 holds sources of two prompts at two layers
    row = torch.tensor([0, 0, 1, 1, 1, 0])
    layer = torch.tensor([top, top, 0, top, top, 1])  # slots enter at layers top, top, 1, 0
    position = torch.tensor([width - 1, width - 2, width - 3, width - 1, width - 1, width - 2])
    injections = Injections(slot, row, layer, position,
                            torch.randn(len(slot), d_model, generator=generator, dtype=torch.float64))
    all_slots = torch.arange(slots)
    zero_inputs = Injections(torch.cat([slot, all_slots]), torch.cat([row, torch.zeros_like(all_slots)]),
                             torch.cat([layer, torch.full_like(all_slots, -1)]),
                             torch.cat([position, torch.zeros_like(all_slots)]),
                             torch.cat([injections.vector, injections.vector.new_zeros(slots, d_model)]))
    rows_seen: list[int] = []
    handles = [module.register_forward_pre_hook(lambda _m, args: rows_seen.append(len(args[0])))
               for module in tiny64.adapter.layer_list(tiny64.model)]
    try:
        entering = push_forward(tiny64, base, Window(0, slots, 0, None), injections, reads, cut=True)
        entered, rows_seen[:] = list(rows_seen), []
        through_all = push_forward(tiny64, base, Window(0, slots, 0, None), zero_inputs, reads, cut=True)
    finally:
        for handle in handles:
            handle.remove()
    expected = [prompts * (1 + (layer_index >= 1) + 2 * (layer_index >= top)) for layer_index in range(top + 1)]
    assert entered == expected and rows_seen == [slots * prompts] * (top + 1)
    assert entering.keys() == through_all.keys()
    assert (through_all["logits"].flatten(1).abs().amax(1) > 0).all()  # every slot reaches the logits
    for key, value in through_all.items():  # float64, the same products over fewer rows
        torch.testing.assert_close(entering[key], value, rtol=1e-12, atol=1e-12 * float(value.abs().max()))


def test_forward_and_vjp_edges_agree(tiny64):
    """Edges from tangent rows (one per source) equal those from backward rows (one per target)."""
    batch = _batch(tiny64, PROMPTS)
    config = TraceConfig(aggregation="none", threshold=0.01, edge_threshold=0.0)
    nodes = select_nodes(node_scores(tiny64, config, batch)[0], config)
    profiles = profiles_pass(tiny64, config, batch, nodes)
    forward = _edge_weights(edges_pass(tiny64, config, batch, profiles, method="forward"))
    vjp = _edge_weights(edges_pass(tiny64, config.model_copy(update={"chunk_size": 3}), batch, profiles, method="vjp"))
    assert forward.keys() == vjp.keys() and any(kind == LOGIT for _, _, kind, _ in forward)
    tolerance, floor = _window_rounding(tiny64, max(abs(weight) for weight in vjp.values()))
    for key, weight in vjp.items():
        assert abs(forward[key] - weight) <= tolerance * max(abs(weight), floor)


def _window_rounding(lm, scale: float) -> tuple[float, float]:
    """(relative tolerance, the magnitude below which it applies to `scale` instead) between a pass over a
    window and one over every position, whose softmaxes round differently. In float64, depth 3: rounding
    ~1e-14 relative. Eager attention (Gemma 2's) takes its softmax in float32 even in a float64 model: a
    few float32 eps per attention weight and per layer, relative to the largest value."""
    if lm.model.config._attn_implementation == "eager":
        return 8 * lm.n_layers * torch.finfo(torch.float32).eps, scale
    return 1e-9, 1.0


def _edge_weights(edges) -> dict[tuple[int, int, int, int], float]:
    columns = (edges.source_kind, edges.source, edges.target_kind, edges.target, edges.weight)
    return {tuple(int(x) for x in key[:4]): key[4] for key in zip(*(c.tolist() for c in columns))}


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2", "qwen2"])
def test_edges_match_explicit_per_pair_computation(float64_models, family):
    lm = float64_models[family]
    batch = _batch(lm)
    config = TraceConfig(aggregation="none", threshold=0.02, edge_threshold=0.0, chunk_size=5)
    nodes = select_nodes(node_scores(lm, config, batch)[0], config)
    profiles = profiles_pass(lm, config, batch, nodes)
    traced = _edge_weights(edges_pass(lm, config, batch, profiles))
    explicit = ExplicitLinearModel(lm, batch.input_ids, batch.attention_mask, batch.position_ids)
    base_logits, base_acts = explicit.forward(hold_mlps=True)
    activation = profiles.activation.double()
    eps = {row: 1e-6 * activation[nodes.row == row].abs().mean() for row in nodes.row.unique().tolist()}
    base_target = base_logits.gather(-1, profiles.targets.ids)

    def check_source(kind: int, index: int, row: int, layer: int, logits, acts) -> int:
        """Compare every traced edge out of one source with the held-MLP ablation's effect."""
        checked = 0
        for t in range(len(nodes)):
            key = (kind, index, NEURON, t)
            if nodes.row[t] != row or nodes.layer[t] <= layer:
                assert key not in traced
                continue
            t_layer, t_row, t_pos, t_neuron = (int(x[t]) for x in (nodes.layer, nodes.row, nodes.position,
                                                                    nodes.neuron))
            a_t = base_acts[t_layer][t_row, t_pos, t_neuron]
            change = a_t - acts[t_layer][t_row, t_pos, t_neuron]  # source . d a_t / d source, MLPs held
            expected = change / (a_t + eps[row] * (1 if a_t >= 0 else -1))
            assert abs(traced[key] - expected.item()) <= 1e-5 * max(1.0, abs(expected.item()))
            checked += 1
        direct = (base_target - logits.gather(-1, profiles.targets.ids))[row] / base_target[row]
        traced_logits = torch.tensor([traced[kind, index, LOGIT, rank] for rank in range(len(direct))])
        torch.testing.assert_close(traced_logits.double(), direct, rtol=1e-5, atol=1e-6)
        return checked

    checked = 0
    for s in torch.linspace(0, len(nodes) - 1, min(10, len(nodes))).long().tolist():
        source = (int(nodes.layer[s]), int(nodes.row[s]), int(nodes.position[s]), int(nodes.neuron[s]))
        checked += check_source(NEURON, s, source[1], source[0], *explicit.forward(zero_neuron=source, hold_mlps=True))

    embedding_nodes = profiles.embedding_nodes
    assert 0 < len(embedding_nodes) < int(batch.valid.sum())
    for e in range(len(embedding_nodes)):
        row, position = int(embedding_nodes.row[e]), int(embedding_nodes.position[e])
        logits, acts = explicit.forward(zero_embedding=(row, position), hold_mlps=True)
        checked += check_source(EMBEDDING, e, row, -1, logits, acts)
    assert checked > 0


def test_embedding_nodes_are_kept_by_the_node_threshold(tiny64):
    batch = _batch(tiny64, PROMPTS)
    config = TraceConfig(aggregation="none", threshold=0.05)
    nodes = select_nodes(node_scores(tiny64, config, batch)[0], config)
    profiles = profiles_pass(tiny64, config, batch, nodes)
    score = profiles.embedding_relevance.abs() / profiles.metric.abs()[:, None]
    kept = torch.zeros_like(batch.valid)
    kept[profiles.embedding_nodes.row, profiles.embedding_nodes.position] = True
    assert not kept[torch.arange(len(PROMPTS)), batch.offsets].any()  # first positions left out
    assert (profiles.embedding_relevance[~batch.valid] == 0).all()
    others = batch.valid.clone()
    others[torch.arange(len(PROMPTS)), batch.offsets] = False
    assert torch.equal(kept[others], score[others] >= config.threshold)


def _tables(run):
    out = {}
    for name in ("prompts", "nodes", "embeddings", "edges"):
        frame = run.read_table("trace", name)
        for column in ("source_kind", "target_kind"):
            if column in frame:
                frame[column] = frame[column].astype(str)
        keys = {"prompts": ["prompt"], "nodes": ["prompt", "node"], "embeddings": ["prompt", "position"],
                "edges": ["prompt", "source_kind", "source", "target_kind", "target"]}[name]
        out[name] = frame.sort_values(keys).reset_index(drop=True)
    return out


def _assert_same_tables(a, b, tol=1e-6):
    for name in a:
        assert list(a[name].columns) == list(b[name].columns)
        assert len(a[name]) == len(b[name]), name
        for column in a[name].columns:
            left, right = a[name][column], b[name][column]
            if left.dtype.kind == "f":
                np.testing.assert_allclose(left, right, rtol=tol, atol=tol, err_msg=f"{name}.{column}")
            elif left.dtype == object and len(left) and isinstance(left.iloc[0], np.ndarray) \
                    and left.iloc[0].dtype.kind == "f":
                np.testing.assert_allclose(np.concatenate(list(left)), np.concatenate(list(right)),
                                           rtol=tol, atol=tol, err_msg=f"{name}.{column}")
            else:
                assert [str(x) for x in left] == [str(x) for x in right], f"{name}.{column}"


def test_batch_invariance(tiny64, tmp_path):
    """A prompt traced alone or in a padded batch of 4 of different lengths gives the same tables."""
    lm = tiny64
    rows = load_dataset("country-capitals", limit=2).rows + load_dataset("addition", limit=1).rows \
        + load_dataset("state-capitals", limit=1).rows
    dataset = load_dataset("country-capitals")
    dataset.rows = rows
    assert len({len(lm.tokenizer(r.prompt)["input_ids"]) for r in rows}) > 1
    config = TraceConfig(aggregation="none", threshold=0.02, chunk_size=16)
    alone = trace_dataset(lm, dataset, config.model_copy(update={"batch_size": 1}), tmp_path / "a", progress=False)
    batched = trace_dataset(lm, dataset, config.model_copy(update={"batch_size": 4}), tmp_path / "b", progress=False)
    _assert_same_tables(_tables(alone), _tables(batched))


def test_pooled_keys_are_the_union_over_the_batch_by_default_and_over_the_dataset_on_request(tiny_models, tmp_path,
                                                                                            caplog):
    """Per-batch pooling (the default) keeps in each prompt the keys that pass in any prompt of its batch,
    so a prompt's nodes do not change when the dataset grows; dataset-wide pooling keeps the keys of
    every prompt in every prompt, and warns that this grows with the dataset."""
    lm = tiny_models["llama"]
    large = load_dataset("country-capitals", limit=8)
    large.rows.sort(key=lambda row: len(encode_prompt(lm.tokenizer, row)))  # the plan keeps this order
    small = load_dataset("country-capitals", limit=4)
    small.rows = large.rows[:4]
    lengths = [len(encode_prompt(lm.tokenizer, row)) for row in large.rows]
    assert len(set(lengths)) > 1
    base = TraceConfig(threshold=0.05, edges=False, batch_size=2)
    assert base.aggregation == "any" and base.aggregate_over == "batch"

    def traced(dataset, name, **settings):
        run = trace_dataset(lm, dataset, base.model_copy(update=settings), tmp_path / name, progress=False)
        nodes = run.read_table("trace", "nodes")
        return nodes.assign(from_end=np.array(lengths)[nodes["prompt"]] - 1 - nodes["position"])

    def keys(nodes, prompts, fitting=None):
        chosen = nodes[nodes["prompt"].isin(prompts)]
        if fitting is not None:  # positions from the end that exist in a prompt of this length, but the first
            chosen = chosen[chosen["from_end"] < fitting - 1]
        return set(zip(chosen.layer, chosen.from_end, chosen.neuron))

    per_prompt = traced(large, "none", aggregation="none")
    by_batch = traced(large, "batch")
    with caplog.at_level("WARNING", logger="adag.trace.run"):
        assert not caplog.records
        by_dataset = traced(large, "dataset", aggregate_over="dataset")
    assert len(caplog.records) == 1 and "grow with the dataset" in caplog.records[0].getMessage()
    for prompt in range(8):
        batch_mates = [prompt - prompt % 2, prompt - prompt % 2 + 1]
        assert keys(by_batch, [prompt]) == keys(per_prompt, batch_mates, lengths[prompt])
        assert keys(by_dataset, [prompt]) == keys(per_prompt, range(8), lengths[prompt])
    assert len(by_dataset) > len(by_batch) > len(per_prompt)
    first_half = by_batch[by_batch["prompt"] < 4].reset_index(drop=True)
    pd.testing.assert_frame_equal(traced(small, "small"), first_half)


def test_topk_selection_and_first_position(tiny_models):
    lm = tiny_models["gpt2"]
    batch = _batch(lm)
    config = TraceConfig(aggregation="none", selection="topk", top_nodes=7)
    scores, relp = node_scores(lm, config, batch)
    nodes = select_nodes(scores, config)
    assert torch.bincount(nodes.row).tolist() == [7, 7]
    assert not (nodes.position == batch.offsets[nodes.row]).any()
    best = scores[1].flatten().topk(7).values
    kept = scores[nodes.row, nodes.layer, nodes.position, nodes.neuron][nodes.row == 1]
    torch.testing.assert_close(kept.sort().values, best.sort().values)
    kept_first = TraceConfig(aggregation="none", keep_first_position=True)
    scores_first, _ = node_scores(lm, kept_first, batch)
    assert scores_first[0, :, batch.offsets[0]].sum() > 0 and scores[0, :, batch.offsets[0]].sum() == 0


def test_blacklist_removes_a_half_neuron(tiny_models):
    lm = tiny_models["llama"]
    batch = _batch(lm)
    config = TraceConfig(aggregation="none", threshold=0.01)
    scores, relp = node_scores(lm, config, batch)
    nodes = select_nodes(scores, config)
    layer, row, pos, neuron = (int(x[0]) for x in (nodes.layer, nodes.row, nodes.position, nodes.neuron))
    linear_pass = linearised_pass(lm, config, batch)
    polarity = int(torch.sign(linear_pass.tap.activations[layer][row, pos, neuron]).item())
    blocked = config.model_copy(update={"blacklist": [(layer, neuron, polarity)]})
    scores_blocked, _ = node_scores(lm, blocked, batch)
    activation = linear_pass.tap.activations[layer][..., neuron].detach()
    same_sign = torch.sign(activation) == polarity
    assert (scores_blocked[:, layer, :, neuron][same_sign] == 0).all()
    assert torch.equal(scores_blocked[:, layer, :, neuron][~same_sign], scores[:, layer, :, neuron][~same_sign])


def test_label_and_logit_diff_metrics(float64_models):
    lm = float64_models["qwen3"]
    tokens = [lm.tokenizer(t)["input_ids"] for t in PROMPTS[:2]]
    a, b = (lm.tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in (" capital", " is"))
    batch = PromptBatch.left_pad(tokens, [[a, b], [b, a]], 0, torch.device("cpu"))
    linear_pass = linearised_pass(lm, TraceConfig(metric="logit_diff"), batch)
    with torch.no_grad():
        logits = lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                          position_ids=batch.position_ids).logits[:, -1]
    expected = torch.stack([logits[0, a] - logits[0, b], logits[1, b] - logits[1, a]])
    torch.testing.assert_close(linear_pass.metric.detach(), expected)
    linear_pass = linearised_pass(lm, TraceConfig(metric="labels"), batch)
    torch.testing.assert_close(linear_pass.metric.detach(), logits[:, a] + logits[:, b])


def test_resume_recomputes_only_missing_parts(tiny_models, tmp_path):
    lm = tiny_models["gemma3"]
    dataset = load_dataset("antonyms", limit=6)
    config = TraceConfig(aggregation="none", threshold=0.05, batch_size=2)
    run = trace_dataset(lm, dataset, config, tmp_path, progress=False)
    first = _tables(run)
    parts = sorted((tmp_path / "trace" / "prompts").glob("part-*.parquet"))
    assert len(parts) == 3
    kept_mtime = parts[0].stat().st_mtime_ns
    parts[1].unlink()
    run.manifest["stages"]["trace"]["status"] = "running"
    again = trace_dataset(lm, dataset, config, tmp_path, progress=False)
    assert parts[0].stat().st_mtime_ns == kept_mtime and parts[1].exists()
    _assert_same_tables(first, _tables(again), tol=0)
    assert again.manifest["stages"]["trace"]["status"] == "done"
    assert set(again.manifest["stages"]["trace"]["phase_seconds"]) == {"node_scores", "profiles", "edges", "write"}
    pd.testing.assert_frame_equal(first["prompts"][["prompt"]], _tables(again)["prompts"][["prompt"]])


def test_a_trace_takes_the_runs_lock_once(tiny_models, tmp_path, monkeypatch):
    """The trace checks the run and writes it under one lock: nothing takes it again inside."""
    taken = []
    lock = RunDir.lock

    def counted(run, shared=False):
        taken.append(shared)
        return lock(run, shared)

    monkeypatch.setattr(RunDir, "lock", counted)
    trace_dataset(tiny_models["llama"], load_dataset("antonyms", limit=2), TraceConfig(threshold=0.05, edges=False),
                  tmp_path, progress=False)
    assert taken == [False] and RunDir.open(tmp_path).stage_done("trace")


def test_a_batch_with_no_kept_nodes_still_records_its_prompts(tiny_models):
    lm = tiny_models["llama"]
    batch = _batch(lm)
    config = TraceConfig(aggregation="none", threshold=50.0)
    nodes = select_nodes(node_scores(lm, config, batch)[0], config)
    assert len(nodes) == 0
    profiles = profiles_pass(lm, config, batch, nodes)
    edges = edges_pass(lm, config, batch, profiles)
    rows = load_dataset("antonyms", limit=2).rows
    tables = batch_tables(BatchAttribution(profiles, edges), batch, [0, 1], rows, lm.tokenizer)
    assert tables["prompts"].num_rows == 2
    assert tables["nodes"].num_rows == tables["embeddings"].num_rows == tables["edges"].num_rows == 0


def test_no_node_in_the_whole_dataset_is_an_error_that_suggests_a_threshold(tiny_models, tmp_path):
    lm = tiny_models["llama"]
    dataset = load_dataset("antonyms", limit=3)
    for threshold in (2.0, 50.0):
        with pytest.raises(AdagError, match=r"no node reached --threshold .* rerun with --threshold 0\.005$"):
            trace_dataset(lm, dataset, TraceConfig(threshold=threshold, edges=False), tmp_path, progress=False)
    run = trace_dataset(lm, dataset, TraceConfig(threshold=0.05, edges=False), tmp_path, progress=False)
    assert run.stage_done("trace") and run.manifest["stages"]["trace"]["nodes"] > 0


def test_aggregation_warns_when_prompts_are_not_one_template(tiny_models, tmp_path, caplog):
    lm = tiny_models["llama"]
    mixed = load_dataset("country-capitals", limit=2)
    mixed.rows = [PromptRow(prompt="Hi"), PromptRow(prompt="What is 3 + 4? Think step by step and then answer."),
                  PromptRow(prompt="the state containing Dallas is Texas, and its capital is")]
    config = TraceConfig(threshold=0.05, edges=False, batch_size=2)  # pooled over batches of 2 prompts
    with caplog.at_level("WARNING", logger="adag.trace.run"):
        trace_dataset(lm, load_dataset("country-capitals", limit=4), config, tmp_path / "template", progress=False)
        assert not caplog.records
        trace_dataset(lm, mixed, config, tmp_path / "mixed", progress=False)
    assert len(caplog.records) == 1 and "--aggregation none" in caplog.records[0].getMessage()


def test_retracing_with_other_settings_is_refused(tiny_models, tmp_path):
    lm = tiny_models["llama"]
    dataset = load_dataset("antonyms", limit=2)
    trace_dataset(lm, dataset, TraceConfig(threshold=0.05, edges=False), tmp_path, progress=False)
    with pytest.raises(AdagError, match="was traced with other settings"):
        trace_dataset(lm, dataset, TraceConfig(threshold=0.01, edges=False), tmp_path, progress=False)
    assert len(RunDir.open(tmp_path).read_table("trace", "prompts")) == 2


TEST_DEVICE = os.environ.get("ADAG_TEST_DEVICE")


@pytest.mark.device
@pytest.mark.skipif(not TEST_DEVICE, reason="run by benchmarks/device_check.sh, which sets ADAG_TEST_DEVICE")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_builtin_model_on_device_conserves_and_matches_the_explicit_model(dtype):
    """The built-in model on ADAG_TEST_DEVICE, checked against the explicit model in float32.

    Tolerance: each layer rounds its output to the dtype (unit roundoff u = eps / 2), and
    independent roundings add up like a random walk, so results drift by about sqrt(depth) * u
    relative to the scale of the quantity compared; 4 * sqrt(layers) * u bounds that with margin
    (fp32: 1.3e-6; bf16: 0.086, where a wrong rule is off by far more). Measured on CPU: fp32 within
    7 u, bf16 within 1 u.
    """
    from adag.models import load_model

    lm = load_model("smollm2-135m", dtype=dtype, device=TEST_DEVICE)
    reference = load_model("smollm2-135m", device=TEST_DEVICE) if dtype != "float32" else lm
    tolerance = 4 * lm.n_layers ** 0.5 * torch.finfo(getattr(torch, dtype)).eps / 2
    rows = load_dataset("country-capitals", limit=2).rows
    tokens = [encode_prompt(lm.tokenizer, row) for row in rows]
    batch = PromptBatch.left_pad(tokens + [tokens[0][3:]], [[]] * 3, 0, lm.device)  # one padded row
    config = TraceConfig(aggregation="none", threshold=0.02)
    nodes = select_nodes(node_scores(lm, config, batch)[0], config)
    profiles = profiles_pass(lm, config, batch, nodes)
    edges = edges_pass(lm, config, batch, profiles)
    assert len(nodes) and len(edges) and torch.isfinite(edges.weight).all()

    relevance, metric = profiles.embedding_relevance.cpu().double(), profiles.metric.cpu().double()
    assert ((relevance.sum(-1) - metric).abs() <= tolerance * relevance.abs().sum(-1)).all()

    explicit = ExplicitLinearModel(reference, batch.input_ids, batch.attention_mask, batch.position_ids)
    base_logits, base_acts = explicit.forward()
    targets = profiles.targets.ids
    base_target = base_logits.gather(-1, targets).double()
    for i in torch.linspace(0, len(nodes) - 1, 6).long().tolist():
        node = (int(nodes.layer[i]), int(nodes.row[i]), int(nodes.position[i]), int(nodes.neuron[i]))
        logits, _ = explicit.forward(zero_neuron=node)
        relp = ((base_target - logits.gather(-1, targets).double())[node[1]] * profiles.targets.coeffs[node[1]]).sum()
        assert abs(profiles.attribution[i].item() - relp.item()) <= tolerance * abs(metric[node[1]].item())
    i = len(nodes) - 1
    layer, row, position, neuron = (int(x[i]) for x in (nodes.layer, nodes.row, nodes.position, nodes.neuron))
    activation = base_acts[layer][row, position, neuron].double()
    expected = torch.stack([activation - explicit.forward(zero_embedding=(row, j))[1][layer][row, position, neuron]
                            for j in range(int(batch.offsets[row]), batch.input_ids.shape[1])]) / activation
    traced = profiles.input_profile[i, int(batch.offsets[row]):].cpu().double()
    assert (traced - expected.cpu()).abs().max() <= tolerance * expected.abs().sum()
