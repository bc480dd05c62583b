import json
import random

import pytest
import torch
from accelerate.utils import compute_module_sizes
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from adag.errors import AdagError
from adag.models import ADAPTERS, adapter_for, load_model
from adag.models.placement import plan_device_map
from adag.trace.tap import NeuronTap
from tests.tiny import FAMILIES, tiny_config

HAS_ACCELERATOR = torch.accelerator.is_available()
RANDOM_BYTES = random.Random(0).randbytes(4096)


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


@pytest.fixture
def saved_model(tmp_path, tiny_models):
    """A tiny llama saved as a Hugging Face directory, for damaging in each test."""
    lm = tiny_models["llama"]
    directory = tmp_path / "model"
    lm.model.save_pretrained(directory)
    lm.tokenizer.save_pretrained(directory)
    return directory


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _drop_a_tensor(path):
    tensors = load_file(path)
    tensors.pop("model.layers.0.mlp.down_proj.weight")
    save_file(tensors, path, metadata={"format": "pt"})


def _widen_mlp_in_config(directory):
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "intermediate_size": 100}))


def _shard_index(directory):
    index = {"metadata": {}, "weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))


DAMAGES = {
    "no config": (lambda d: (d / "config.json").unlink(), "has no config.json"),
    "config not JSON": (lambda d: (d / "config.json").write_text("{model_type: llama"), "config.json is not valid"),
    "config binary": (lambda d: (d / "config.json").write_bytes(RANDOM_BYTES[:64] + b"\xff"), "is not valid JSON"),
    "config a list": (lambda d: (d / "config.json").write_text("[1, 2]"), "has no 'model_type'"),
    "no weights": (lambda d: (d / "model.safetensors").unlink(), "has config.json but no *.safetensors weights"),
    "pickled weights only": (lambda d: (d / "model.safetensors").rename(d / "pytorch_model.bin"),
                             "only pickled pytorch_model.bin, which adag does not load"),
    "truncated weights": (lambda d: _truncate(d / "model.safetensors"), "model.safetensors is damaged"),
    "random-bytes weights": (lambda d: (d / "model.safetensors").write_bytes(RANDOM_BYTES),
                             "model.safetensors is damaged"),
    "empty weights": (lambda d: (d / "model.safetensors").write_bytes(b""), "model.safetensors is damaged"),
    "missing tensor": (lambda d: _drop_a_tensor(d / "model.safetensors"), "the weights lack 1 tensor(s)"),
    "shapes unlike config": (_widen_mlp_in_config, "the weights do not fit config.json"),
    "missing shard": (_shard_index, "lacks the weight shard model-00002-of-00002.safetensors"),
    "no tokenizer": (lambda d: (d / "tokenizer.json").unlink(), "could not load the tokenizer"),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_damaged_model_directory_is_one_line_naming_it(saved_model, damage):
    """Each way a model directory can be broken names the directory or file and what to do."""
    spoil, message = DAMAGES[damage]
    spoil(saved_model)
    with pytest.raises(AdagError) as error:
        load_model(str(saved_model))
    text = str(error.value)
    assert message in text and str(saved_model) in text and "\n" not in text


@pytest.mark.parametrize("spec, message", [
    ("gpt2", "hub ids name the organisation too, as in org/name"),
    ("./no-such-dir", "no such directory"),
    ("a/b/c", "no such directory"),
])
def test_unusable_model_names_say_how_to_name_one(spec, message):
    with pytest.raises(AdagError, match=message) as error:
        load_model(spec)
    assert "\n" not in str(error.value)


def test_model_file_instead_of_directory(saved_model):
    with pytest.raises(AdagError, match="is a file; pass the directory"):
        load_model(str(saved_model / "config.json"))


@pytest.mark.parametrize("device", [
    pytest.param("cuda", marks=pytest.mark.skipif(HAS_ACCELERATOR, reason="this machine has an accelerator")),
    pytest.param("cuda:5", marks=pytest.mark.skipif(torch.accelerator.device_count() > 5, reason="has 6 GPUs")),
    "banana",
])
def test_unavailable_device_is_refused_before_loading(device):
    """The device is checked first: the model named here does not even exist."""
    with pytest.raises(AdagError, match=f"device '{device}'.*use one of: cpu, .*auto") as error:
        load_model("no-such-model", device=device)
    assert "\n" not in str(error.value)


def _device_of(device_map, name):
    """The device a module lands on: the map's entry for the longest prefix of its name."""
    owners = [key for key in device_map if key == "" or name == key or name.startswith(key + ".")]
    return device_map[max(owners, key=len)]


@pytest.mark.parametrize("family", FAMILIES)
def test_auto_placement_spreads_whole_layers_in_order(family):
    """Three fake GPUs that each hold 60% of the model: every parameter placed once, each decoder layer
    whole on one GPU, layers in order over the GPUs, and tied embeddings with lm_head."""
    config = tiny_config(family, 384)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    total = compute_module_sizes(skeleton)[""]
    device_map = plan_device_map(config, torch.float32, {gpu: int(0.6 * total) for gpu in range(3)})

    assert set(device_map.values()) <= {0, 1, 2}
    names = {id(module): name for name, module in skeleton.named_modules()}
    layers = [names[id(layer)] for layer in ADAPTERS[config.model_type].layer_list(skeleton)]
    assert not any(key.startswith(layer + ".") for key in device_map for layer in layers), "a layer was split"
    placed = [_device_of(device_map, layer) for layer in layers]
    assert placed == sorted(placed) and len(set(placed)) >= 2
    for name, _ in skeleton.named_parameters(remove_duplicate=False):
        assert [key for key in device_map if key == "" or name.startswith(key + ".")], f"{name} unplaced"
    embeddings = names[id(skeleton.get_input_embeddings())]
    head = names[id(skeleton.get_output_embeddings())]
    if skeleton.get_output_embeddings().weight is skeleton.get_input_embeddings().weight:
        assert _device_of(device_map, embeddings) == _device_of(device_map, head)


def test_auto_placement_refuses_a_model_too_large():
    config = tiny_config("llama", 384)
    with pytest.raises(AdagError, match=r"weights need 0\.\d MiB but do not fit .*0: 0\.0 MiB, 1: 0\.0 MiB"):
        plan_device_map(config, torch.float32, {0: 20_000, 1: 20_000})


def test_auto_placement_on_cpu_only_keeps_one_copy_on_cpu():
    assert plan_device_map(tiny_config("gemma2", 384), torch.float32, {"cpu": 2**30}) == {"": "cpu"}


@pytest.mark.skipif(HAS_ACCELERATOR, reason="auto places on the accelerator here")
def test_auto_device_without_gpus_runs_on_cpu(saved_model, tiny_models):
    """`--device auto` on a machine without GPUs plans everything onto the CPU and gives the same logits."""
    lm = tiny_models["llama"]
    placed = load_model(str(saved_model), device="auto")
    assert placed.device == torch.device("cpu")
    assert {p.device.type for p in placed.model.parameters()} == {"cpu"}
    with torch.no_grad():
        assert torch.equal(placed.model(_ids(lm)).logits, lm.model(_ids(lm)).logits)
