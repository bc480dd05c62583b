import pytest
import torch

from adag.errors import AdagError
from adag.models import ADAPTERS, adapter_for, load_model
from adag.trace.tap import NeuronTap
from tests.tiny import FAMILIES


def _ids(lm, text="What is the capital of France? Answer:"):
    return torch.tensor([lm.tokenizer(text)["input_ids"]])


def test_every_family_has_an_adapter():
    assert {adapter_for(ADAPTERS[t].model_types[0]).model_types[0] for t in ADAPTERS} >= {
        "llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "gpt2"}
    assert len(FAMILIES) == 7


def test_unsupported_family_lists_supported():
    with pytest.raises(AdagError, match="not supported; supported families: .*llama"):
        adapter_for("mamba")


def test_tap_captures_exactly_what_the_output_projection_receives(tiny):
    """Checked against a hand-written pre-hook on the MLP output projection of every layer."""
    seen = {}
    layers = tiny.adapter.layer_list(tiny.model)
    handles = [
        layer.get_submodule(tiny.adapter.mlp_out).register_forward_pre_hook(
            lambda _m, args, i=i: seen.__setitem__(i, args[0].detach().clone()))
        for i, layer in enumerate(layers)
    ]
    try:
        with torch.no_grad():
            plain = tiny.model(_ids(tiny)).logits
            with NeuronTap(tiny.model, tiny.adapter) as tap:
                tapped = tiny.model(_ids(tiny)).logits
    finally:
        for handle in handles:
            handle.remove()
    assert torch.equal(plain, tapped)
    assert len(tap.activations) == len(layers) == tiny.n_layers
    for i in range(len(layers)):
        assert tap.activations[i].shape[-1] == tiny.n_neurons
        assert torch.equal(tap.activations[i], seen[i])


def test_tap_is_removed_on_exit(tiny):
    module = tiny.adapter.layer_list(tiny.model)[0].get_submodule(tiny.adapter.mlp_out)
    before = len(module._forward_pre_hooks)
    with pytest.raises(RuntimeError), NeuronTap(tiny.model, tiny.adapter):
        raise RuntimeError("boom")
    assert len(module._forward_pre_hooks) == before


def test_unknown_model_spec_is_one_clear_line():
    with pytest.raises(AdagError) as error:
        load_model("definitely-not-a-model")
    message = str(error.value)
    assert "\n" not in message and "unknown model 'definitely-not-a-model'" in message


def test_unknown_dtype():
    with pytest.raises(AdagError, match="unknown dtype"):
        load_model("smollm2-135m", dtype="float8")


def test_hub_id_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(AdagError, match="could not get model 'nobody/nothing'"):
        load_model("nobody/nothing")


def test_local_directory_loads(tmp_path, tiny_models):
    lm = tiny_models["qwen3"]
    lm.model.save_pretrained(tmp_path)
    lm.tokenizer.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path))
    assert loaded.adapter is lm.adapter
    assert len(loaded.weights_hash) == 16
    with torch.no_grad():
        assert torch.equal(loaded.model(_ids(lm)).logits, lm.model(_ids(lm)).logits)


@pytest.mark.builtin
def test_builtin_model_offline(builtin_load_times, monkeypatch):
    lm, first, second = builtin_load_times
    ids = torch.tensor([lm.tokenizer("The capital of France is")["input_ids"]])
    with torch.no_grad():
        top = lm.model(ids).logits[0, -1].argmax().item()
    assert lm.tokenizer.decode([top]) == " Paris"
    assert (lm.n_layers, lm.n_neurons) == (30, 1536)
    assert second < 10, f"cached load took {second:.1f}s"
