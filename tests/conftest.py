import json
import os
import shutil
import time

import pytest
import torch

from adag.datasets import load_dataset
from tests.fake_openai import FakeOpenAI
from tests.tiny import FAMILIES, in_float64, offline_tokenizer, tiny_model

# ADAG_TEST_THREADS=N runs the suite with N torch threads (default: the CPUs shared out among the pytest-xdist
# workers, `make test` runs two), in this process and in the processes its tests start (the CLI, torchrun, the
# notebook's kernel). Every numeric tolerance must hold for any N, since the thread count changes the order of
# floating-point sums. On a shared machine, threads beyond a worker's share wait on each other at every op.
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 1)
THREADS = int(os.environ.get("ADAG_TEST_THREADS") or max(1, (os.cpu_count() or 1) // WORKERS))
torch.set_num_threads(THREADS)
os.environ["OMP_NUM_THREADS"] = str(THREADS)


def pytest_configure(config):
    config.addinivalue_line("markers", "device: checks of the built-in model on the device named by "
                            "ADAG_TEST_DEVICE (run by benchmarks/device_check.sh; skipped otherwise)")


def pytest_collection_modifyitems(items):
    """Tests of the built-in model (marked `builtin`, or taking a fixture that loads it) and of the browser are
    slow: `-m "not slow"` leaves them out."""
    for item in items:
        loads_builtin = {"builtin", "builtin_load_times"} & set(getattr(item, "fixturenames", ()))
        if item.get_closest_marker("builtin") or item.get_closest_marker("browser") or loads_builtin:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def tokenizer():
    return offline_tokenizer()


@pytest.fixture(scope="session")
def tiny_models(tokenizer):
    return {family: tiny_model(family, tokenizer) for family in FAMILIES}


@pytest.fixture(params=FAMILIES)
def tiny(request, tiny_models):
    return tiny_models[request.param]


@pytest.fixture(scope="session")
def shared_clustered_run(tiny_models, tmp_path_factory):
    """The run the stage tests share, made once per session: six country-capital prompts traced with the tiny
    Llama (threshold 0.03, with edges) and clustered (k=3). Read it only; `clustered_run` is a copy to write in."""
    from adag.cluster import ClusterConfig, cluster_run
    from adag.trace import TraceConfig, trace_dataset

    path = tmp_path_factory.mktemp("shared") / "run"
    trace_dataset(tiny_models["llama"], load_dataset("country-capitals", limit=6), TraceConfig(threshold=0.03), path,
                  progress=False)
    cluster_run(str(path), ClusterConfig(k=3))
    return path


@pytest.fixture(scope="module")
def clustered_run(shared_clustered_run, tmp_path_factory):
    """A module's own copy of the shared run, which its tests may add stages to or rewrite."""
    copy = tmp_path_factory.mktemp("clustered") / "run"
    shutil.copytree(shared_clustered_run, copy, ignore=shutil.ignore_patterns(".lock", ".staging"))
    return copy


@pytest.fixture(scope="module")
def model_dir(tokenizer, tmp_path_factory):
    """A tiny Llama saved as a Hugging Face directory, so that `--model DIR` loads it."""
    path = tmp_path_factory.mktemp("tiny-llama")
    lm = tiny_model("llama", tokenizer)
    lm.model.save_pretrained(path)
    lm.tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def dataset_file(tmp_path_factory):
    """Six country-capital prompts as a .jsonl file, with a numeric metadata field."""
    path = tmp_path_factory.mktemp("data") / "capitals.jsonl"
    rows = [r.model_dump() | {"metadata": {"score": float(i % 3)}} for i, r in
            enumerate(load_dataset("country-capitals", limit=6).rows)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


@pytest.fixture(scope="module")
def server():
    """A fake OpenAI-compatible LLM server that answers every request."""
    with FakeOpenAI() as fake:
        yield fake


@pytest.fixture(scope="session")
def float64_models(tokenizer):
    """Float64 copies of every family, for comparisons with slow references and exact identities."""
    return {family: in_float64(tiny_model(family, tokenizer)) for family in FAMILIES}


@pytest.fixture(params=FAMILIES)
def tiny64(request, float64_models):
    return float64_models[request.param]


@pytest.fixture(scope="session")
def builtin_load_times(tmp_path_factory):
    """Load the built-in model twice from a clean cache: the first load converts the GGUF."""
    from adag.models import load_model

    cache = tmp_path_factory.mktemp("adag-cache")
    previous = os.environ.get("ADAG_CACHE")
    os.environ["ADAG_CACHE"] = str(cache)
    try:
        start = time.perf_counter()
        load_model("smollm2-135m")
        first = time.perf_counter() - start
        start = time.perf_counter()
        lm = load_model("smollm2-135m")
        second = time.perf_counter() - start
    finally:
        if previous is None:
            os.environ.pop("ADAG_CACHE")
        else:
            os.environ["ADAG_CACHE"] = previous
    print(f"\nbuilt-in model: first load (GGUF conversion) {first:.1f}s, second load {second:.2f}s")
    return lm, first, second


@pytest.fixture(scope="session")
def builtin():
    """The built-in SmolLM2 in float32, converted once per machine into the adag cache (ADAG_CACHE); only
    `builtin_load_times` converts it anew, so that a worker of `make test` that needs the model loads it in
    seconds."""
    from adag.models import load_model

    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def gemma():
    """The built-in Gemma 3 270M base model in float32. Converted once per machine into the adag cache
    (ADAG_CACHE, about two minutes); every later session loads the cached safetensors copy."""
    from adag.models import load_model

    return load_model("gemma3-270m")


@pytest.fixture(scope="module")
def qwen():
    """The built-in Qwen2.5-Coder-1.5B-Instruct in float32 (7.1 GB): converted once per machine into the
    adag cache (about two minutes, 9 GB at peak), then loaded in seconds. Module-scoped, so that it is
    freed when the module that uses it is done."""
    from adag.models import load_model

    return load_model("qwen2.5-coder-1.5b")
