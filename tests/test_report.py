import json
from pathlib import Path

import jsonschema
import numpy as np
import pytest
from PIL import Image
from selenium.webdriver.common.by import By

from adag.cluster import ClusterConfig, cluster_run
from adag.datasets import load_dataset
from adag.describe import DescribeConfig, describe_run
from adag.errors import AdagError
from adag.report import neuronpedia_graph, serve_in_background, write_neuronpedia, write_report
from adag.report.export import graph_schema
from adag.store import RunDir
from adag.trace import TraceConfig, trace_dataset
from tests.browser import chromium, click_cluster, open_page
from tests.fake_openai import FakeOpenAI

HOSTILE = "<script>window.pwned=1</script><b>bold</b> What is the capital of France?"


@pytest.fixture(scope="module")
def described_run(tiny_models, tmp_path_factory):
    path = tmp_path_factory.mktemp("run")
    data = tmp_path_factory.mktemp("data") / "hostile.jsonl"
    rows = [{"prompt": HOSTILE, "seed_response": "Answer:"}]
    rows += [r.model_dump() for r in load_dataset("country-capitals", limit=5).rows]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    trace_dataset(tiny_models["llama"], load_dataset(str(data)), TraceConfig(threshold=0.03), path, progress=False)
    cluster_run(str(path), ClusterConfig(k=3))
    cache = tmp_path_factory.mktemp("cache")
    with FakeOpenAI() as server, pytest.MonkeyPatch.context() as patch:
        patch.setenv("ADAG_CACHE", str(cache))
        spec = f"openai:fake@{server.url}"
        describe_run(str(path), DescribeConfig(explainer=spec, simulator=spec, samples=1), progress=False)
    return path


def _not_blank(png: str) -> None:
    pixels = np.asarray(Image.open(png).convert("RGB"), dtype=float)
    assert pixels.std() > 10 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50


def _check_viewer(driver, run_path, screenshot):
    label = RunDir.open(run_path).read_table("describe", "descriptions").set_index("cluster").loc[0, "label"]
    assert driver.find_elements(By.CSS_SELECTOR, "g.cluster-node")
    click_cluster(driver, 0)
    assert driver.find_element(By.ID, "panel-label").text == label
    assert "names of countries" in driver.find_element(By.ID, "input-description").text
    assert driver.find_elements(By.CSS_SELECTOR, "#neurons circle")
    driver.save_screenshot(str(screenshot))
    _not_blank(str(screenshot))


def test_served_viewer(described_run, tmp_path):
    server = serve_in_background(str(described_run))
    try:
        with chromium() as driver:
            open_page(driver, f"http://127.0.0.1:{server.server_port}/")
            _check_viewer(driver, described_run, tmp_path / "served.png")
    finally:
        server.shutdown()
        server.server_close()


def test_report_is_self_contained_and_escapes_prompts(described_run, tmp_path):
    path = write_report(str(described_run), str(tmp_path / "report.html"))
    html = path.read_text()
    assert "https://" not in html and "http://" not in html.replace("http://www.w3.org/2000/svg", "")
    assert "<script>window.pwned" not in html
    with chromium() as driver:
        open_page(driver, path.as_uri())
        _check_viewer(driver, described_run, tmp_path / "report.png")
        assert driver.execute_script("return window.pwned === undefined")
        prompts = RunDir.open(described_run).read_table("trace", "prompts")
        hostile = int(prompts[prompts["text"] == HOSTILE]["prompt"].iloc[0])
        options = driver.find_elements(By.CSS_SELECTOR, "#neuron-prompt option")
        next(o for o in options if o.get_attribute("value") == str(hostile)).click()
        shown = driver.find_element(By.ID, "neuron-prompt-text").text
        assert "<script>window.pwned=1</script><b>bold</b>" in shown  # rendered as text
        assert not driver.find_elements(By.CSS_SELECTOR, "#neuron-prompt-text b")


def test_neuronpedia_export_validates(described_run, tmp_path):
    graph = neuronpedia_graph(str(described_run), 0)
    jsonschema.validate(graph, graph_schema())
    ids = {n["node_id"] for n in graph["nodes"]}
    assert all(link["source"] in ids and link["target"] in ids for link in graph["links"])
    assert graph["qParams"]["supernodes"] and all(s[0] for s in graph["qParams"]["supernodes"])
    assert any(n["feature_type"] == "embedding" for n in graph["nodes"])
    with pytest.raises(AdagError, match="no prompt 999"):
        neuronpedia_graph(str(described_run), 999)
    written = json.loads(write_neuronpedia(str(described_run), 1, str(tmp_path / "g.json")).read_text())
    assert written["metadata"]["prompt_tokens"]


def test_packaged_schema_matches_the_shared_one():
    shared = Path(__file__).resolve().parents[1].parent / "shared" / "schemas" / "neuronpedia-graph.schema.json"
    if shared.exists():  # beside the checkout in the project's workspace and in CI
        assert json.loads(shared.read_text()) == graph_schema()
    assert graph_schema()["required"] == ["metadata", "qParams", "nodes", "links"]
