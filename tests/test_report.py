import http.client
import json
import os
import socket
from pathlib import Path

import jsonschema
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import Select, WebDriverWait
from typer.testing import CliRunner

from adag.cli import app
from adag.cluster import ClusterConfig, cluster_run
from adag.datasets import load_dataset
from adag.describe import DescribeConfig, describe_run
from adag.describe.config import DESCRIBE_STAGE
from adag.errors import AdagError
from adag.pipeline import writing
from adag.report import neuronpedia_graph, serve_in_background, write_neuronpedia, write_report
from adag.report.config import TARGET_INPUTS, FigureConfig, ReportConfig
from adag.report.data import (
    chosen_prompts,
    compact_excerpt,
    graph_of,
    prompt_payload,
    prompt_row,
    round_significant,
    run_payload,
)
from adag.report.export import graph_schema
from adag.report.figure import write_figure
from adag.report.graph import (
    CONTINUED,
    PARTIAL,
    collapse_clusters,
    correct_target,
    expected_answer,
    prompt_graph,
    pruning_order,
    readable_tokens,
)
from adag.report.html import allowed_host
from adag.report.layout import GAP, cluster_layout, prompt_layout, text_width, visible
from adag.report.palette import NEGATIVE, POSITIVE, ciede2000, cluster_color, hex_to_rgb, rgb_to_lab
from adag.store import RunDir
from adag.trace import TraceConfig, trace_dataset
from adag.view import RunView
from tests.browser import (
    chromium,
    click_cluster,
    console_errors,
    geometry,
    open_page,
    page_state,
    redraw,
    select,
    set_range,
    set_viewport,
)
from tests.fake_openai import FakeOpenAI
from tests.synthetic import synthetic_run

HOSTILE = "<script>window.pwned=1</script><b>bold</b> What is the capital of France?"
LABELS = ["capital cities of Europe", "say a capital", "France / French", "question words",
          "the token ' of' before a place name", "<b>markup</b> & 'quotes'", "country", "answer format"]


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


@pytest.fixture(scope="module")
def demo_like(tmp_path_factory):
    """Shaped like the demo: 30 layers, chat-template-length prompts, most nodes late, labelled clusters."""
    path = tmp_path_factory.mktemp("demo-like") / "run"
    synthetic_run(path, prompts=6, layers=30, nodes=110, last_share=0.6, length=(36, 44), neurons=60, clusters=8,
                  edge_density=0.08, labels=LABELS)
    return path


@pytest.fixture(scope="module")
def crowded(tmp_path_factory):
    """Hundreds of nodes, nearly all at the last position."""
    path = tmp_path_factory.mktemp("crowded") / "run"
    synthetic_run(path, prompts=2, layers=30, nodes=320, last_share=0.95, length=(12, 16), neurons=40, clusters=6,
                  edge_density=0.02, labels=LABELS[::-1], seed=1)
    return path


def _not_blank(png: str) -> None:
    pixels = np.asarray(Image.open(png).convert("RGB"), dtype=float)
    assert pixels.std() > 10 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50


def _overlap(a, b, tolerance: float = 0.5) -> bool:
    return (a[0] < b[2] - tolerance and b[0] < a[2] - tolerance and a[1] < b[3] - tolerance
            and b[1] < a[3] - tolerance)


def _circle_box(circle) -> list[float]:
    x, y, r = circle
    return [x - r, y - r, x + r, y + r]


def _assert_no_circle_overlaps(circles) -> None:
    c = np.array(circles)
    distance = np.hypot(c[:, None, 0] - c[None, :, 0], c[:, None, 1] - c[None, :, 1])
    touching = distance < (c[:, None, 2] + c[None, :, 2]) - 0.5  # 0.5 px: coordinates are rounded to 0.1 unit
    np.fill_diagonal(touching, False)
    assert not touching.any(), f"{touching.sum() // 2} pairs of node circles overlap"


def _assert_cluster_labels_clear(shape) -> None:
    """No cluster label overlaps another label or a circle."""
    labels = [t["box"] for t in shape["clusters"]]
    others = [t["box"] for t in shape["tokens"] + shape["others"]] + [_circle_box(c) for c in shape["circles"]]
    for i, a in enumerate(labels):
        assert not any(_overlap(a, b) for b in labels[i + 1:] + others), shape["clusters"][i]["full"]


def _check_prompt_graph(driver, tokens: list[str]) -> None:
    shape = geometry(driver, "neurons")
    left, _, right, _ = shape["svg"]
    xs = [(c[0] - c[2], c[0] + c[2]) for c in shape["circles"]]
    span = (max(x for _, x in xs) - min(x for x, _ in xs)) / (right - left)
    assert span >= 0.7, f"nodes span {span:.0%} of the graph's width"
    _assert_no_circle_overlaps(shape["circles"])
    assert [t["full"] for t in shape["tokens"]] == tokens
    assert [t["text"] for t in shape["tokens"]] == [visible(t, 14) for t in tokens]
    boxes = [t["box"] for t in shape["tokens"]]
    assert not any(_overlap(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
    _assert_cluster_labels_clear(shape)


def _count(driver) -> str:
    return driver.find_element(By.ID, "neuron-count").text


def _check_controls(driver) -> None:
    """Pruning and supernodes change what is drawn, and the counts say so."""
    count = _count(driver)
    assert " of " in count and "nodes" in count and "edges" in count
    redraw(driver, lambda: set_range(driver, "prune", 30))
    pruned = _count(driver)
    assert int(pruned.split()[0]) < int(count.split()[0])
    redraw(driver, lambda: set_range(driver, "edge-weight", 0))
    every = int(_count(driver).split()[4])
    redraw(driver, lambda: set_range(driver, "edge-weight", 90))  # 90% of each target's strongest input
    assert int(_count(driver).split()[4]) < every
    select(driver, share=None, edges=None)  # the defaults
    assert _count(driver) == count
    redraw(driver, lambda: driver.find_element(By.ID, "supernodes").click())
    assert _count(driver) != count
    shape = geometry(driver, "neurons")
    _assert_no_circle_overlaps(shape["circles"])
    _assert_cluster_labels_clear(shape)
    assert shape["clusters"], "supernodes carry their cluster labels"
    redraw(driver, lambda: driver.find_element(By.ID, "supernodes").click())
    assert _count(driver) == count


def _check_hover_and_click(driver) -> None:
    neuron = driver.find_element(By.CSS_SELECTOR, '#neurons circle[data-kind="neuron"]')
    driver.execute_script("arguments[0].scrollIntoView({block: 'center', inline: 'center'})", neuron)
    ActionChains(driver).move_to_element(neuron).perform()
    tooltip = driver.find_element(By.ID, "tooltip")
    WebDriverWait(driver, 10).until(lambda d: tooltip.is_displayed())
    assert all(word in tooltip.text for word in ("layer", "position", "neuron", "activation", "attribution",
                                                 "cluster"))
    redraw(driver, lambda: driver.execute_script("arguments[0].dispatchEvent(new MouseEvent('click', "
                                                 "{bubbles: true}))", neuron))
    assert driver.find_elements(By.CSS_SELECTOR, "#neurons circle.highlight")
    faded = driver.find_elements(By.CSS_SELECTOR, "#neurons path.faded")
    lit = driver.find_elements(By.CSS_SELECTOR, "#neurons path.edge:not(.faded)")
    assert faded and lit is not None
    assert driver.find_element(By.ID, "panel-label").text


def _check_viewer_layout(run: Path, out: Path, every_prompt: bool = False) -> None:
    path, _, _ = write_report(str(run), str(out / "report.html"))
    view = RunView.open(run)
    with chromium() as driver:
        open_page(driver, path.as_uri())
        options = driver.find_elements(By.CSS_SELECTOR, "#neuron-prompt option")
        for option in (options if every_prompt else options[:2])[::-1]:
            redraw(driver, option.click)
            _check_prompt_graph(driver, list(prompt_row(view, int(option.get_attribute("value")))["tokens"]))
        _assert_cluster_labels_clear(geometry(driver, "graph"))
        ticks = [t["text"] for t in geometry(driver, "graph")["others"]]
        assert "layer" in ticks and any(t.isdigit() for t in ticks)
        _check_controls(driver)
        legend = driver.find_element(By.ID, "legend").text  # coloured by cluster first
        assert any(f"{c}: {label}" in legend for c, label in view.labels.items())
        redraw(driver, lambda: Select(driver.find_element(By.ID, "color-by")).select_by_value("sign"))
        assert "raises the answer" in driver.find_element(By.ID, "legend").text
        _check_hover_and_click(driver)
        assert not console_errors(driver)
        driver.save_screenshot(str(out / "page.png"))
        _not_blank(str(out / "page.png"))


@pytest.mark.browser
@pytest.mark.parametrize("which", ["demo_like", "crowded"])
def test_prompt_graph_layout_in_the_browser(which, request, tmp_path):
    _check_viewer_layout(request.getfixturevalue(which), tmp_path)


@pytest.mark.browser
@pytest.mark.skipif(not os.environ.get("ADAG_VIEWER_RUN"), reason="set ADAG_VIEWER_RUN to a clustered run, "
                    "e.g. runs/demo after `make demo`")
def test_viewer_layout_on_a_given_run(tmp_path):
    """The same checks on every prompt of a real run: ADAG_VIEWER_RUN=runs/demo pytest -k given_run."""
    run = Path(os.environ["ADAG_VIEWER_RUN"])
    _check_viewer_layout(run, tmp_path, every_prompt=True)
    path, _, _ = write_report(str(run), str(tmp_path / "researcher.html"))
    with chromium() as driver:
        for size in SIZES:
            _check_researcher_view(driver, run, path.as_uri(), size, every_prompt=True)


def test_layouts_leave_no_overlaps(crowded, demo_like):
    """The layout itself (before any browser): circles apart, labels clear of circles and each other."""
    for run in (crowded, demo_like):
        view = RunView.open(run)
        for prompt in view.prompts["prompt"]:
            graph = graph_of(view, int(prompt))
            layout = prompt_layout(graph)
            for drawn, placed in ((graph, layout),
                                  (collapse_clusters(graph), None)):
                placed = placed or prompt_layout(drawn, grid=layout.grid)
                circles = np.c_[placed.x, placed.y, placed.r]
                _assert_no_circle_overlaps(circles)
                boxes = [[lab.x, lab.y - 7, lab.x + lab.length, lab.y + 7] for lab in placed.labels
                         if lab.kind == "cluster"]
                assert not any(_overlap(a, b) for i, a in enumerate(boxes)
                               for b in boxes[i + 1:] + [_circle_box(c) for c in circles])
                assert placed.x.min() - placed.r.max() >= 0 and placed.x.max() + placed.r.max() <= placed.width


def test_cluster_layout_spreads_clusters_that_share_a_layer():
    mean_layer = np.array([5.0] * 12 + [5.2, 9.0])
    labels = [f"a label of some length, longer than fits {i}" for i in range(14)]
    layout = cluster_layout(mean_layer, np.linspace(1, 2, 14), labels)
    boxes = [[x - 13, y - 13, x + 13 + GAP + text_width(lab.text), y + 13]
             for x, y, lab in zip(layout.x, layout.y, layout.labels)]
    assert not any(_overlap(a, b, tolerance=0) for i, a in enumerate(boxes) for b in boxes[i + 1:])
    assert all(lab.text.endswith("\u2026") for lab in layout.labels)  # cut, the full text is a tooltip
    order = np.argsort(layout.y)  # later layers higher up
    assert layout.y[13] == layout.y[order[0]]


def test_byte_level_tokens_show_the_text_they_make():
    """Pieces of one character (each decoding to U+FFFD alone) show the character, found in the decoded prompt."""
    bad = "\ufffd"
    tokens = ["The", " caf", bad, bad, " is", " open", bad]
    shown = readable_tokens(tokens, "The caf\u00e9 is open\u20ac")
    assert shown == ["The", " caf", "\u00e9", CONTINUED + "\u00e9", " is", " open", "\u20ac"]
    assert readable_tokens(tokens, "") == ["The", " caf", PARTIAL, PARTIAL, " is", " open", PARTIAL]
    assert readable_tokens(["a", "b"], "ab") == ["a", "b"]


def test_the_expected_answer_is_marked_among_the_targets(demo_like):
    row = pd.Series({"labels": [" Paris", " Rome"], "metadata": "{}"})
    assert expected_answer(row) == " Paris"
    assert expected_answer(pd.Series({"labels": [], "metadata": '{"answer": "Paris"}'})) == "Paris"
    assert expected_answer(pd.Series({"metadata": "{}"})) == ""
    assert correct_target([" The", " Par", " Paris", " P"], "Paris") == 2  # the longest token that begins it
    assert correct_target([" Rome"], "Paris") == -1 and correct_target([" "], " ") == -1
    view = RunView.open(demo_like)
    row = prompt_row(view, 0).copy()
    row["metadata"] = json.dumps({"answer": row["target_tokens"][1].strip() + "ville"})
    graph = prompt_graph(row, view.nodes_by_prompt[0], view.embeddings_by_prompt[0], view.edges_by_prompt[0],
                         view.model["layers"], view.labels)
    logits = [label for label in prompt_layout(graph).labels if label.kind == "logit"]
    assert [label.text.startswith("\u2713") for label in logits] == [False, True] + [False] * (len(logits) - 2)
    assert graph.nodes["correct"].sum() == 1


def test_cluster_graph_labels_carry_their_ids(demo_like):
    layout = run_payload(RunView.open(demo_like), [])["cluster_graph"]["layout"]
    assert all(label["full"].startswith(f"{c}: ") for c, label in enumerate(layout["labels"]))


def test_prompt_graph_matches_the_tables(demo_like):
    view = RunView.open(demo_like)
    for prompt in view.prompts["prompt"]:
        graph = graph_of(view, int(prompt))
        nodes, edges = graph.nodes, graph.edges
        mine = view.edges_by_prompt[int(prompt)]
        assert len(edges) == len(mine)
        assert (nodes["kind"] == "embedding").sum() == len(view.embeddings_by_prompt[int(prompt)])
        assert (nodes["kind"] == "logit").sum() == len(prompt_row(view, int(prompt))["target_tokens"])
        source_kind = nodes["kind"].to_numpy()[edges["source"]]
        assert (source_kind == mine["source_kind"].astype(str).to_numpy()).all()
        embedding = mine["source_kind"].astype(str).to_numpy() == "embedding"
        assert (nodes["position"].to_numpy()[edges["source"][embedding]] == mine["source"][embedding]).all()
        np.testing.assert_array_equal(edges["attribution"], mine["attribution"].astype(float))


def test_supernodes_are_the_prompts_cluster_graph(demo_like):
    """Supernode attributions and edges equal the cluster stage's per-prompt cluster graph; edges into
    an ungrouped node keep their summed weights."""
    view = RunView.open(demo_like)
    run = RunDir.open(demo_like)
    prompt_clusters, cluster_edges = run.read_table("cluster", "prompt_clusters"), run.read_table("cluster",
                                                                                                  "cluster_edges")
    for prompt in view.prompts["prompt"]:
        graph = graph_of(view, int(prompt))
        collapsed = collapse_clusters(graph)
        nodes = collapsed.nodes
        supers = nodes[nodes["kind"] == "supernode"].set_index("cluster")
        expected = prompt_clusters[prompt_clusters["prompt"] == prompt].set_index("cluster")["attribution"]
        np.testing.assert_allclose(supers["attribution"].sort_index(), expected.sort_index(), rtol=1e-5)
        edges = collapsed.edges
        both = (nodes["kind"].to_numpy()[edges["source"]] == "supernode") & (
            nodes["kind"].to_numpy()[edges["target"]] == "supernode")
        mine = pd.DataFrame({"source_cluster": nodes["cluster"].to_numpy()[edges["source"][both]],
                             "target_cluster": nodes["cluster"].to_numpy()[edges["target"][both]],
                             "attribution": edges["attribution"][both].to_numpy()})
        stage = cluster_edges[cluster_edges["prompt"] == prompt].drop(columns="prompt")
        merged = mine.merge(stage, on=["source_cluster", "target_cluster"], suffixes=("", "_stage"), how="outer")
        np.testing.assert_allclose(merged["attribution"], merged["attribution_stage"], rtol=1e-4, atol=1e-6)
        assert (supers["members"].sum() == ((graph.nodes["kind"] == "neuron") & (graph.nodes["cluster"] >= 0)).sum())
        # logits are never grouped: the weight into a logit is the sum of its members' weights
        logit = np.flatnonzero(graph.nodes["kind"] == "logit")[0]
        into = graph.edges[graph.edges["target"] == logit]
        new_logit = np.flatnonzero(nodes["kind"] == "logit")[0]
        np.testing.assert_allclose(edges[edges["target"] == new_logit]["weight"].sum(), into["weight"].sum(),
                                   rtol=1e-9)


def test_pruning_keeps_the_fewest_nodes_that_carry_the_share(demo_like):
    graph = graph_of(RunView.open(demo_like), 0)
    for drawn in (graph, collapse_clusters(graph)):
        order = pruning_order(drawn)
        strength = drawn.nodes["attribution"].abs().to_numpy()
        features = drawn.nodes["kind"].isin(["neuron", "supernode"]).to_numpy()
        for share in (0.1, 0.5, 0.8, 0.95):
            kept = features & (order < share)
            total = strength[features].sum()
            assert strength[kept].sum() >= share * total - 1e-9
            weakest = np.flatnonzero(kept)[np.argmin(strength[kept])]
            assert strength[kept].sum() - strength[weakest] < share * total
        assert (order[~features] == 0).all()  # token and logit nodes are always drawn


@pytest.mark.browser
def test_report_embeds_the_strongest_prompts_and_says_how_many_are_left_out(demo_like, tmp_path):
    view = RunView.open(demo_like)
    totals = view.node_keys.assign(s=view.node_keys["attribution"].abs()).groupby("prompt")["s"].sum()
    assert chosen_prompts(view, 2) == sorted(totals.sort_values(ascending=False).index[:2].tolist())
    assert chosen_prompts(view, 2, [5, 1]) == [1, 5]
    with pytest.raises(AdagError, match="no prompt 99"):
        chosen_prompts(view, 2, [99])
    path, embedded, total = write_report(str(demo_like), str(tmp_path / "r.html"), ReportConfig(prompts=2))
    assert (embedded, total) == (2, 6)
    with chromium() as driver:
        open_page(driver, path.as_uri())
        options = driver.find_elements(By.CSS_SELECTOR, "#neuron-prompt option")
        assert sorted(int(o.get_attribute("value")) for o in options) == chosen_prompts(view, 2)
        assert "2 of 6 prompts" in driver.find_element(By.ID, "left-out").text
        assert "4 left out" in driver.find_element(By.ID, "left-out").text
    result = CliRunner().invoke(app, ["report", str(demo_like), "--out", str(tmp_path / "c.html"),
                                      "--prompt-ids", "0,3"])
    assert result.exit_code == 0 and "2 of 6 prompts; 4 left out" in result.output


def _check_viewer(driver, run_path, screenshot):
    label = RunDir.open(run_path).read_table("describe", "descriptions").set_index("cluster").loc[0, "label"]
    assert driver.find_elements(By.CSS_SELECTOR, "g.cluster-node")
    click_cluster(driver, 0)
    assert driver.find_element(By.ID, "panel-label").text == label
    assert "names of countries" in driver.find_element(By.ID, "input-description").text
    assert driver.find_elements(By.CSS_SELECTOR, "#neurons circle")
    driver.save_screenshot(str(screenshot))
    _not_blank(str(screenshot))


def _get(server, path: str, host: str | None = None) -> http.client.HTTPResponse:
    connection = http.client.HTTPConnection("127.0.0.1", server.server_port, timeout=30)
    connection.putrequest("GET", path, skip_host=True)
    connection.putheader("Host", f"127.0.0.1:{server.server_port}" if host is None else host)
    connection.endheaders()
    return connection.getresponse()


@pytest.mark.browser
def test_served_viewer_loads_graphs_on_demand_and_is_hardened(described_run, tmp_path):
    server = serve_in_background(str(described_run))
    try:
        page = _get(server, "/")
        assert page.status == 200
        assert page.getheader("X-Content-Type-Options") == "nosniff"
        assert page.getheader("X-Frame-Options") == "DENY"
        policy = page.getheader("Content-Security-Policy")
        assert "default-src 'none'" in policy and "script-src 'sha256-" in policy and "unsafe" not in policy
        assert page.getheader("Server") == "adag"
        data = json.loads(_get(server, "/api/data").read())
        assert data["graphs"] == {} and len(data["prompts"]) == 6
        graph = json.loads(_get(server, "/api/prompt/1").read())
        assert graph["prompt"] == 1 and graph["neurons"]["kind"]
        assert _get(server, "/api/prompt/999").status == 404
        assert _get(server, "/../manifest.json").status == 404
        for host in ("evil.example", "evil.example:80", "127.0.0.1.evil.example", ""):
            response = _get(server, "/api/data", host)
            assert response.status == 403, host
            assert b"prompt" not in response.read()
        assert _get(server, "/", f"localhost:{server.server_port}").status == 200
        with chromium() as driver:
            open_page(driver, f"http://127.0.0.1:{server.server_port}/")
            _check_viewer(driver, described_run, tmp_path / "served.png")
            options = driver.find_elements(By.CSS_SELECTOR, "#neuron-prompt option")
            assert len(options) == 6  # every prompt, fetched when chosen
            redraw(driver, options[3].click)
            assert driver.find_elements(By.CSS_SELECTOR, "#neurons circle")
            assert not [e for e in console_errors(driver) if "favicon" not in e]
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.browser
def test_report_is_self_contained_and_escapes_prompts(described_run, tmp_path):
    path, _, _ = write_report(str(described_run), str(tmp_path / "report.html"))
    html = path.read_text()
    assert "https://" not in html and "http://" not in html.replace("http://www.w3.org/2000/svg", "")
    assert "<script>window.pwned" not in html
    assert 'http-equiv="Content-Security-Policy"' in html and "__ADAG_CSP__" not in html
    with chromium() as driver:
        open_page(driver, path.as_uri())
        _check_viewer(driver, described_run, tmp_path / "report.png")
        assert driver.execute_script("return window.pwned === undefined")
        prompts = RunDir.open(described_run).read_table("trace", "prompts")
        hostile = int(prompts[prompts["text"] == HOSTILE]["prompt"].iloc[0])
        options = driver.find_elements(By.CSS_SELECTOR, "#neuron-prompt option")
        redraw(driver, next(o for o in options if o.get_attribute("value") == str(hostile)).click)
        shown = driver.find_element(By.ID, "neuron-prompt-text").text
        assert "<script>window.pwned=1</script><b>bold</b>" in shown  # rendered as text
        assert not driver.find_elements(By.CSS_SELECTOR, "#neuron-prompt-text b")
        assert not driver.find_elements(By.CSS_SELECTOR, "#neurons b, #neurons script")
        assert not console_errors(driver)  # nothing the page needs is blocked by its own policy


def test_neuronpedia_export_validates(described_run, tmp_path):
    graph = neuronpedia_graph(str(described_run), 0)
    jsonschema.validate(graph, graph_schema())
    ids = {n["node_id"] for n in graph["nodes"]}
    assert all(link["source"] in ids and link["target"] in ids for link in graph["links"])
    assert graph["qParams"]["supernodes"] and all(s[0] for s in graph["qParams"]["supernodes"])
    view = RunView.open(described_run)
    kept = view.embeddings_by_prompt[0]
    embedded = [n for n in graph["nodes"] if n["feature_type"] == "embedding"]
    assert sorted(n["ctx_idx"] for n in embedded) == sorted(kept["position"].tolist())  # the kept ones only
    edges = view.edges_by_prompt[0]
    assert len(graph["links"]) == len(edges)
    from_embeddings = [link for link in graph["links"] if link["source"].startswith("E_")]
    assert len(from_embeddings) == int((edges["source_kind"].astype(str) == "embedding").sum())
    with pytest.raises(AdagError, match="no prompt 999"):
        neuronpedia_graph(str(described_run), 999)
    written = json.loads(write_neuronpedia(str(described_run), 1, str(tmp_path / "g.json")).read_text())
    assert written["metadata"]["prompt_tokens"]


def test_figures(demo_like, tmp_path):
    png = write_figure(str(demo_like), str(tmp_path / "g.png"), FigureConfig(prompt=1))
    _not_blank(str(png))
    svg = write_figure(str(demo_like), str(tmp_path / "s.svg"), FigureConfig(prompt=1, supernodes=True,
                                                                             color_by="cluster"))
    assert svg.read_text().lstrip().startswith("<?xml") and "<svg" in svg.read_text()
    clusters = write_figure(str(demo_like), str(tmp_path / "c.png"), FigureConfig(clusters=True))
    _not_blank(str(clusters))
    runner = CliRunner()
    ok = runner.invoke(app, ["figure", str(demo_like), "--prompt", "2", "--out", str(tmp_path / "cli.svg")])
    assert ok.exit_code == 0 and (tmp_path / "cli.svg").exists()
    for args, message in ((["--prompt", "2", "--out", str(tmp_path / "x.gif")], ".svg, .png, .pdf"),
                          (["--out", str(tmp_path / "x.png")], "either --prompt"),
                          (["--prompt", "1", "--clusters", "--out", str(tmp_path / "x.png")], "either --prompt"),
                          (["--prompt", "77", "--out", str(tmp_path / "x.png")], "no prompt 77"),
                          (["--prompt", "1", "--share", "2", "--out", str(tmp_path / "x.png")], "--share")):
        bad = runner.invoke(app, ["figure", str(demo_like), *args])
        assert bad.exit_code == 2 and message in bad.output and "Traceback" not in bad.output, bad.output
        assert len(bad.output.strip().splitlines()) == 1


@pytest.mark.parametrize(("header", "bound", "allowed"), [
    ("127.0.0.1:8000", "127.0.0.1", True), ("localhost:8000", "127.0.0.1", True), ("[::1]:8000", "::1", True),
    ("LOCALHOST", "127.0.0.1", True), ("myhost.lan:8000", "myhost.lan", True), ("192.168.1.5:8000", "0.0.0.0", True),
    ("evil.example", "127.0.0.1", False), ("evil.example", "0.0.0.0", False), ("192.168.1.5", "127.0.0.1", False),
    ("127.0.0.1.nip.io", "127.0.0.1", False), (None, "127.0.0.1", False), ("[::1", "127.0.0.1", False),
])
def test_only_the_bound_address_or_localhost_may_ask(header, bound, allowed):
    assert allowed_host(header, bound) is allowed


def test_serve_names_the_bad_option(demo_like):
    runner = CliRunner()
    for args, wanted in ((["--host", "no-such-host.invalid"], "--host"), (["--host", "192.0.2.1"], "--host"),
                         (["--port", "70000"], "--port"), (["--port", "-1"], "--port")):
        result = runner.invoke(app, ["serve", str(demo_like), *args])
        assert result.exit_code == 2 and wanted in result.output and "Traceback" not in result.output
        if wanted == "--host":
            assert "--port" not in result.output


def test_trace_records_the_targets_probabilities(described_run, tiny_models):
    """The viewer labels target logits with these: the plain model's softmax at the last position."""
    lm = tiny_models["llama"]
    prompts = RunDir.open(described_run).read_table("trace", "prompts")
    for row in prompts.itertuples():
        with torch.no_grad():
            logits = lm.model(input_ids=torch.tensor([list(row.token_ids)])).logits[0, -1].double()
        expected = logits.softmax(-1)[list(row.target_ids)].numpy()
        # float32 logits of a left-padded batch differ from this unpadded pass by ~1e-6 relative; a
        # probability moves by at most p * |change in logit|, well under 1e-4
        np.testing.assert_allclose(row.target_probs, expected, atol=1e-4)
        assert np.all(np.diff(row.target_probs) <= 1e-7)  # top-k targets, most likely first


def test_payload_numbers_keep_their_significant_digits():
    values = np.random.default_rng(0).normal(size=1000) * 10.0 ** np.random.default_rng(1).integers(-8, 8, 1000)
    rounded = np.array(round_significant(values, 3))
    np.testing.assert_allclose(rounded, values, rtol=5e-3)  # 3 significant digits: within half a unit of the 3rd
    assert all(len(repr(v).lstrip("-")) <= 10 for v in rounded.tolist())  # no 0.30000000000000004 tails
    assert round_significant([np.nan, np.inf, 0.0]) == [None, None, 0.0]


def test_packaged_schema_matches_the_shared_one():
    shared = Path(__file__).resolve().parents[1].parent / "shared" / "schemas" / "neuronpedia-graph.schema.json"
    if shared.exists():  # beside the checkout in the project's workspace and in CI
        assert json.loads(shared.read_text()) == graph_schema()
    assert graph_schema()["required"] == ["metadata", "qParams", "nodes", "links"]


# ---- a viewer researchers can work in ----

SIZES = [(1000, 700), (1400, 900)]
MIN_DELTA_E = 15.0  # CIEDE2000: clearly different side by side (just noticeable is about 1-2)
RECT = "(e) => { const r = e.getBoundingClientRect(); return [r.left, r.top, r.right, r.bottom]; }"
STATE = "const s = window.adag.state(); return [s.prompt, s.cluster, [...s.pins].sort(), s.groups, s.names, s.share]"


@pytest.fixture(scope="module")
def forty(tmp_path_factory):
    """40 prompts in 20 clusters, demo-shaped otherwise."""
    path = tmp_path_factory.mktemp("forty") / "run"
    synthetic_run(path, prompts=40, layers=30, nodes=80, last_share=0.6, length=(36, 44), neurons=200, clusters=20,
                  edge_density=0.08, labels=[f"{label} ({i})" for i in range(3) for label in LABELS], seed=3)
    return path


def test_palette_colours_stay_apart():
    # CIEDE2000 against published reference pairs (Sharma, Wu and Dalal 2005, pairs 1, 7, 17 and 25)
    pairs = [((50, 2.6772, -79.7751), (50, 0, -82.7485), 2.0425), ((50, 0, 0), (50, -1, 2), 2.3669),
             ((50, 2.5, 0), (73, 25, -18), 27.1492),
             ((60.2574, -34.0099, 36.2677), (60.4626, -34.1751, 39.4387), 1.2644)]
    for a, b, expected in pairs:
        assert ciede2000(np.array(a), np.array(b)) == pytest.approx(expected, abs=1e-4)
        assert ciede2000(np.array(b), np.array(a)) == pytest.approx(expected, abs=1e-4)
    np.testing.assert_allclose(rgb_to_lab(np.ones(3)), [100, 0, 0], atol=1e-3)
    palette = [cluster_color(c) for c in range(20)]
    assert len(set(palette)) == 20 and cluster_color(20) == palette[0]
    lab = rgb_to_lab(np.array([hex_to_rgb(c) for c in palette]))
    apart = ciede2000(lab[:, None], lab[None, :])
    np.fill_diagonal(apart, np.inf)
    assert apart.min() >= MIN_DELTA_E, f"closest clusters {apart.min():.1f} apart"
    signs = rgb_to_lab(np.array([hex_to_rgb(POSITIVE), hex_to_rgb(NEGATIVE)]))
    assert ciede2000(lab[:, None], signs[None, :]).min() >= MIN_DELTA_E


def _in_view(driver) -> dict:
    """What of the prompt graph is inside both its scroll box and the window, in page pixels."""
    return driver.execute_script("""
      const box = document.getElementById('neurons-scroll').getBoundingClientRect();
      const frame = [Math.max(box.left, 0), Math.max(box.top, 0), Math.min(box.right, innerWidth),
                     Math.min(box.bottom, innerHeight)];
      const rect = (e) => { const r = e.getBoundingClientRect(); return [r.left, r.top, r.right, r.bottom]; };
      const svg = document.getElementById('neurons');
      return {frame, tokens: [...svg.querySelectorAll('.token-label')].map(rect),
              logits: [...svg.querySelectorAll('circle[data-kind=logit]')].map(rect),
              logitLabels: [...svg.querySelectorAll('.logit-label')].map(rect)};""")


def _inside(box, frame, slack: float = 1.0) -> bool:
    return (box[0] >= frame[0] - slack and box[1] >= frame[1] - slack and box[2] <= frame[2] + slack
            and box[3] <= frame[3] + slack)


def _drawn(driver) -> dict:
    return driver.execute_script("""
      const svg = document.getElementById('neurons');
      return {circles: [...svg.querySelectorAll('circle')].map(c => [Number(c.dataset.index), c.dataset.kind,
                        c.getAttribute('class'), c.dataset.key, c.getAttribute('fill')]),
              edges: [...svg.querySelectorAll('path.edge')].map(p => [Number(p.dataset.source),
                                                                      Number(p.dataset.target)])};""")


def _check_targets_explained(driver) -> None:
    """Every drawn target logit shows its TARGET_INPUTS strongest positive and negative inputs, read through
    window.adag.graph() and drawn(); and the default cutoff does prune."""
    whole, drawn = driver.execute_script("return [window.adag.graph(), window.adag.drawn()]")
    shown = {(s, t) for s, t, _ in drawn["edges"]}
    logits = [key for key in drawn["nodes"] if key.startswith("l:")]
    assert logits, "the target logits are drawn"
    positive, negative = TARGET_INPUTS
    for logit in logits:
        into = [(s, w) for s, t, w in whole["edges"] if t == logit]
        wanted = (sorted((e for e in into if e[1] > 0), key=lambda e: -e[1])[:positive]
                  + sorted((e for e in into if e[1] < 0), key=lambda e: e[1])[:negative])
        missing = [e for e in wanted if (e[0], logit) not in shown]
        assert not missing, f"{logit}: strongest inputs not drawn: {missing}"
    assert len(drawn["edges"]) < len(whole["edges"]) or len(whole["edges"]) < 10


def _shift_click(driver, selector: str) -> None:
    redraw(driver, lambda: driver.execute_script(
        "document.querySelector(arguments[0]).dispatchEvent(new MouseEvent('click', {bubbles: true, shiftKey: true}))",
        selector))


def _check_researcher_view(driver, run: Path, url: str, size: tuple[int, int], every_prompt: bool) -> None:
    view = RunView.open(run)
    set_viewport(driver, *size)
    driver.get("about:blank")
    open_page(driver, url)
    assert driver.execute_script("return [innerWidth, innerHeight]") == list(size)
    options = [int(o.get_attribute("value")) for o in driver.find_elements(By.CSS_SELECTOR, "#neuron-prompt option")]
    assert options == sorted(options)  # dataset order
    for prompt in options if every_prompt else options[:3]:
        select(driver, prompt=prompt)
        _check_targets_explained(driver)
    select(driver, prompt=options[0])
    _check_page_fits(driver)
    for prompt in options[:3] if every_prompt else options[:1]:
        if prompt != options[0]:
            redraw(driver, lambda p=prompt: Select(driver.find_element(By.ID, "neuron-prompt")).select_by_value(str(p)))
        seen = _in_view(driver)
        assert _inside(seen["tokens"][-1], seen["frame"]), f"prompt {prompt}: last position out of view at {size}"
        for box in seen["logits"] + seen["logitLabels"]:
            assert _inside(box, seen["frame"]), f"prompt {prompt}: a top logit is out of view at {size}"
    prompt = options[1]
    redraw(driver, lambda: Select(driver.find_element(By.ID, "neuron-prompt")).select_by_value(str(prompt)))
    payload = prompt_payload(view, prompt)["neurons"]
    # the largest nodes carry labels that touch nothing
    shape = geometry(driver, "neurons")
    node_labels = [t["box"] for t in shape["others"] if t["text"] and "node-label" in t["cls"]]
    neurons = len([key for key in driver.execute_script("return window.adag.drawn()")["nodes"] if key[0] == "n"])
    assert len(node_labels) >= min(14, neurons) * 0.7, "most of the 14 largest neurons are labelled"
    for i, a in enumerate(node_labels):
        assert not any(_overlap(a, b) for b in node_labels[i + 1:] + [_circle_box(c) for c in shape["circles"]])
    # a cluster selected anywhere outlines exactly its members in the prompt graph
    drawn = _drawn(driver)
    clusters = [payload["cluster"][i] for i, kind, *_ in drawn["circles"] if kind == "neuron"]
    chosen = max(set(clusters) - {-1}, key=clusters.count)
    click_cluster(driver, chosen)
    WebDriverWait(driver, 10).until(lambda d: f":{chosen}:" in d.find_element(By.ID, "neurons")
                                    .get_attribute("data-drawn"))
    drawn = _drawn(driver)
    members = {i for i, kind, cls, *_ in drawn["circles"] if "member" in cls.split()}
    expected = {i for i, kind, *_ in drawn["circles"] if kind == "neuron" and payload["cluster"][i] == chosen}
    assert members == expected and members
    fills = {fill for i, kind, cls, key, fill in drawn["circles"] if i in members}
    assert fills == {view_color(driver, chosen)}, "the cluster has one colour in both graphs"
    # arrowheads on every cluster edge
    heads = driver.execute_script("return [...document.querySelectorAll('#graph path.cluster-edge')]"
                                  ".map(p => p.getAttribute('marker-end'))")
    assert heads and all(h in ("url(#arrow-pos)", "url(#arrow-neg)") for h in heads)
    assert len(driver.find_elements(By.CSS_SELECTOR, "#graph marker path")) == 2
    # the hover card of the lowest node stays inside the window
    lowest = max((c for c in driver.find_elements(By.CSS_SELECTOR, '#neurons circle[data-kind="neuron"]')),
                 key=lambda c: c.rect["y"])
    driver.execute_script("arguments[0].scrollIntoView({block: 'end', inline: 'center'})", lowest)  # clear of the axis
    ActionChains(driver).move_to_element(lowest).perform()
    tooltip = driver.find_element(By.ID, "tooltip")
    WebDriverWait(driver, 10).until(lambda d: tooltip.is_displayed())
    box = driver.execute_script(f"return ({RECT})(arguments[0])", tooltip)
    assert _inside(box, [0, 0, *size])
    assert "cluster" in tooltip.text and "fires on" in tooltip.text
    _check_node_box(driver, logit_key="l:0")
    # pin a logit and its strongest sources, group them, rename the cluster (Enter), prune: all in the URL
    logit = next(i for i, kind, *_ in drawn["circles"] if kind == "logit")
    sources = [s for s, t in drawn["edges"] if t == logit]
    _shift_click(driver, f'#neurons circle[data-index="{logit}"]')
    for source in sources[:2]:
        _shift_click(driver, f'#neurons circle[data-index="{source}"]')
    driver.find_element(By.ID, "group-name").send_keys("my answer path")
    redraw(driver, lambda: driver.find_element(By.ID, "group-pins").click())
    redraw(driver, lambda: driver.find_element(By.ID, "rename-input").send_keys("renamed here", Keys.ENTER))
    redraw(driver, lambda: set_range(driver, "prune", 60))
    saved = driver.execute_script(STATE)
    assert len(saved[2]) == 1 + len(sources[:2]) and saved[3][0]["name"] == "my answer path"
    _check_groups_and_export(driver, saved[2])
    subgraph = driver.execute_script("return window.adag.subgraphJson()")
    url_with_state = driver.current_url
    assert "#" in url_with_state
    driver.get("about:blank")
    open_page(driver, url_with_state)
    again = driver.execute_script(STATE)
    assert again == saved
    pinned = {key for *_, cls, key, _ in _drawn(driver)["circles"] if "pinned" in cls.split()}
    assert pinned == set(saved[2])
    assert driver.find_element(By.ID, "panel-label").text == "renamed here"
    assert driver.find_elements(By.CSS_SELECTOR, "#neurons .group-label")
    # the saved subgraph is a Neuronpedia graph, as `adag export` writes, of the pinned nodes
    jsonschema.validate(subgraph, graph_schema())
    full = neuronpedia_graph(str(run), prompt)
    ids = {n["node_id"] for n in full["nodes"]}
    assert {n["node_id"] for n in subgraph["nodes"]} <= ids and len(subgraph["nodes"]) == len(saved[2])
    weights = {(link["source"], link["target"]): link["weight"] for link in full["links"]}
    assert subgraph["links"]
    for link in subgraph["links"]:
        assert link["weight"] == pytest.approx(weights[(link["source"], link["target"])], rel=1e-3)
    assert subgraph["qParams"]["supernodes"][0][0] == "my answer path"
    assert sorted(subgraph["qParams"]["pinnedIds"]) == sorted(n["node_id"] for n in subgraph["nodes"])
    pinned_edges = [e for e in driver.execute_script("return window.adag.drawn()")["edges"]
                    if e[0] in pinned and e[1] in pinned]
    assert len(pinned_edges) == len(subgraph["links"]), "every edge between pins is drawn, as the JSON has it"
    _check_history(driver, saved[2])
    assert not console_errors(driver)


def _check_page_fits(driver) -> None:
    """No sideways scroll of the page or the side panel; the cluster graph inside its box; layer numbers in view."""
    fits = driver.execute_script(f"""
      const rect = {RECT}, side = document.getElementById('side');
      return {{page: [document.documentElement.scrollWidth, innerWidth], side: [side.scrollWidth, side.clientWidth],
               graph: rect(document.getElementById('graph')), box: rect(document.getElementById('graph-box')),
               frame: rect(document.getElementById('neurons-scroll')),
               ticks: [...document.querySelectorAll('#neurons-axis text')].map(rect)}};""")
    assert fits["page"][0] <= fits["page"][1], f"the page scrolls sideways: {fits['page']}"
    assert fits["side"][0] <= fits["side"][1], f"the side panel scrolls sideways: {fits['side']}"
    assert _inside(fits["graph"], fits["box"]) and fits["box"][2] <= fits["page"][1], "the cluster graph overflows"
    visible_ticks = [t for t in fits["ticks"] if fits["frame"][0] <= t[0] and t[2] <= fits["frame"][2]]
    assert len(visible_ticks) >= 3, "the layer numbers are in view"


def _check_node_box(driver, logit_key: str) -> None:
    """Clicking a node lists every input and output with its weight, sortable."""
    redraw(driver, lambda: driver.execute_script(
        "document.querySelector(`#neurons circle[data-key='${arguments[0]}']`).dispatchEvent("
        "new MouseEvent('click', {bubbles: true}))", logit_key))
    whole = driver.execute_script("return window.adag.graph()")
    into = sorted(w for s, t, w in whole["edges"] if t == logit_key)
    rows = driver.find_elements(By.CSS_SELECTOR, "#node-inputs tr.row")
    assert len(rows) == len(into)
    weights = [float(r.get_attribute("data-weight")) for r in rows]
    assert weights == sorted(weights, key=lambda w: -abs(w))  # by |weight| first
    header = driver.find_element(By.CSS_SELECTOR, '#node-inputs th[data-sort="weight"]')
    header.click()
    rows = driver.find_elements(By.CSS_SELECTOR, "#node-inputs tr.row")
    weights = [float(r.get_attribute("data-weight")) for r in rows]
    assert weights == sorted(weights, reverse=True) and weights == pytest.approx(into[::-1], rel=1e-6)
    redraw(driver, lambda: driver.execute_script("document.getElementById('neurons').dispatchEvent("
                                                 "new MouseEvent('click', {bubbles: true}))"))  # focus off


def _check_groups_and_export(driver, pins: list[str]) -> None:
    """A group rings its own members only; the SVG export holds exactly what is drawn."""
    rings = driver.execute_script("return [...document.querySelectorAll('#neurons .group-ring')]"
                                  ".map(r => r.dataset.member)")
    drawn = driver.execute_script("return window.adag.drawn()")
    assert sorted(rings) == sorted(k for k in pins if k in drawn["nodes"])
    from xml.etree import ElementTree
    svg = ElementTree.fromstring(driver.execute_script("return window.adag.drawnSvg()"))
    ns = "{http://www.w3.org/2000/svg}"
    nodes = [c.get("data-key") for c in svg.iter(f"{ns}circle") if c.get("data-key")]
    assert sorted(nodes) == sorted(drawn["nodes"])
    assert len([e for e in svg.iter(f"{ns}path") if "edge" in (e.get("class") or "")]) == len(drawn["edges"])
    assert any(t.text == "layer" for t in svg.iter(f"{ns}text"))


def _check_history(driver, pins: list[str]) -> None:
    """Another prompt keeps this one's pins aside and says so; Back returns to this prompt with its pins."""
    before = page_state(driver)
    other = next(int(o.get_attribute("value")) for o in driver.find_elements(By.CSS_SELECTOR, "#neuron-prompt option")
                 if int(o.get_attribute("value")) != before["prompt"])
    redraw(driver, lambda: Select(driver.find_element(By.ID, "neuron-prompt")).select_by_value(str(other)))
    assert page_state(driver)["pins"] == []
    assert f"prompt {before['prompt']}" in driver.find_element(By.ID, "kept-pins").text
    redraw(driver, driver.back)
    after = page_state(driver)
    assert after["prompt"] == before["prompt"] and sorted(after["pins"]) == sorted(pins)


def view_color(driver, cluster: int) -> str:
    return driver.find_element(By.CSS_SELECTOR, f'#graph g.cluster-node[data-cluster="{cluster}"] circle'
                               ).get_attribute("fill")


@pytest.mark.browser
@pytest.mark.parametrize("which", ["demo_like", "forty"])
def test_viewer_researchers_can_work_in(which, request, tmp_path):
    """At 1000x700 and 1400x900: the answer in view, explained, linked selection, state in the URL, saved subgraph."""
    run = request.getfixturevalue(which)
    path, _, _ = write_report(str(run), str(tmp_path / "report.html"))
    with chromium() as driver:
        for n, size in enumerate(SIZES):
            _check_researcher_view(driver, run, path.as_uri(), size, every_prompt=n == 0)
        driver.save_screenshot(str(tmp_path / "page.png"))
        _not_blank(str(tmp_path / "page.png"))


# The page's fetch of /api/steer replaced by one that records each request and answers when told to.
FAKE_STEER = """
window.steerRequests = [];
const real = window.fetch;
window.fetch = (url, options) => {
  if (!String(url).includes('api/steer')) return real(url, options);
  const body = JSON.parse(options.body);
  window.steerRequests.push(body);
  return new Promise(resolve => { window.answerSteer = () => resolve(new Response(JSON.stringify({prompt: body.prompt,
    multiplier: body.multiplier, baseline: [{token: ' Paris', prob: 0.7}, {token: ' Lyon', prob: 0.1}],
    steered: [{token: ' Lyon', prob: 0.5}, {token: ' Paris', prob: 0.2}]}), {status: 200})); });
};
"""


@pytest.mark.browser
def test_steer_box_checks_the_multiplier_and_keeps_its_results(demo_like):
    """Served: bad multipliers give a message and send nothing; the button waits for the answer; the result
    says what was steered and stays through selection changes, at both sizes."""
    server = serve_in_background(str(demo_like))
    try:
        with chromium() as driver:
            for size in SIZES:
                set_viewport(driver, *size)
                driver.get("about:blank")
                open_page(driver, f"http://127.0.0.1:{server.server_port}/")
                driver.execute_script(FAKE_STEER)
                box = driver.find_element(By.ID, "steer-box")
                assert box.rect["y"] < size[1], "the steer box is in view without scrolling"
                select(driver, cluster=2)
                field = driver.find_element(By.ID, "steer-multiplier")
                for typed in ("abc", "", "nan", "1e9"):
                    field = driver.find_element(By.ID, "steer-multiplier")
                    field.clear()
                    if typed:
                        field.send_keys(typed)
                    driver.find_element(By.ID, "steer-run").click()
                    message = driver.find_element(By.ID, "steer-message").text
                    assert message and ("number" in message or "range" in message or "multiplier" in message), typed
                assert driver.execute_script("return window.steerRequests.length") == 0
                field = driver.find_element(By.ID, "steer-multiplier")
                field.clear()
                field.send_keys("0.5")
                driver.find_element(By.ID, "steer-run").click()
                WebDriverWait(driver, 10).until(lambda d: d.execute_script("return window.steerRequests.length") == 1)
                assert not driver.find_element(By.ID, "steer-run").is_enabled()
                assert "loading the model" in driver.find_element(By.ID, "steer-message").text
                assert driver.execute_script("return window.steerRequests[0]") == {"prompt": 0, "cluster": 2,
                                                                                   "multiplier": 0.5}
                driver.execute_script("window.answerSteer()")
                WebDriverWait(driver, 10).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#steer-steered tr"))
                said = driver.find_element(By.ID, "steer-what-was").text
                assert "cluster 2" in said and "\u00d70.5" in said and "prompt 0" in said
                _shift_click(driver, '#neurons circle[data-kind="neuron"]')  # a selection change
                select(driver, cluster=3, prompt=1)
                assert driver.find_element(By.ID, "steer-what-was").text == said
                assert len(driver.find_elements(By.CSS_SELECTOR, "#steer-steered tr")) == 3
                assert driver.find_element(By.ID, "steer-run").is_enabled()
                driver.find_element(By.ID, "steer-run").click()  # a second request does not load the model again
                WebDriverWait(driver, 10).until(lambda d: d.execute_script("return window.steerRequests.length") == 2)
                assert "loading the model" not in driver.find_element(By.ID, "steer-message").text
                assert not console_errors(driver)
    finally:
        server.shutdown()
        server.server_close()


def _post(server, body: bytes, kind: str = "application/json", host: str | None = None) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", server.server_port, timeout=120)
    headers = {"Content-Type": kind, "Host": host or f"127.0.0.1:{server.server_port}"}
    connection.request("POST", "/api/steer", body=body, headers=headers)
    response = connection.getresponse()
    return response.status, response.read()


def _outside_address() -> str | None:
    """An address of this machine other than loopback, if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # TEST-NET: nothing is sent
            address = probe.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") else address


@pytest.fixture(scope="module")
def builtin_run(builtin, tmp_path_factory):
    """One prompt traced with the built-in model (no edges, a high threshold: quick) and clustered."""
    path = tmp_path_factory.mktemp("builtin-run") / "run"
    trace_dataset(builtin, load_dataset("country-capitals", limit=1), TraceConfig(threshold=0.05, edges=False), path,
                  progress=False)
    cluster_run(str(path), ClusterConfig(k=2))
    return path


@pytest.mark.builtin
def test_steer_from_the_served_page(builtin, builtin_run):
    loads = []
    server = serve_in_background(str(builtin_run), load_model=lambda: loads.append(1) or builtin)
    try:
        assert server.server_address[0] == "127.0.0.1"  # loopback unless --host says otherwise
        outside = _outside_address()
        if outside is not None:
            with pytest.raises(OSError):
                socket.create_connection((outside, server.server_port), timeout=5).close()
        assert not loads  # loaded on first use
        view = RunView.open(builtin_run)
        cluster = int(view.clusters.sort_values("size").iloc[-1]["cluster"])
        status, body = _post(server, json.dumps({"prompt": 0, "cluster": cluster, "multiplier": 1}).encode())
        assert status == 200, body
        same = json.loads(body)
        assert same["baseline"] == same["steered"] and len(same["baseline"]) == 10
        assert same["baseline"][0]["token"] == prompt_row(view, 0)["target_tokens"][0]
        status, body = _post(server, json.dumps({"prompt": 0, "cluster": cluster, "multiplier": 0}).encode())
        ablated = json.loads(body)
        before = {t["token"]: t["prob"] for t in ablated["baseline"]}
        after = {t["token"]: t["prob"] for t in ablated["steered"]}
        assert ablated["baseline"] == same["baseline"]
        assert max(abs(before[t] - after.get(t, 0.0)) for t in before) > 1e-3, "ablating a traced cluster moves it"
        nodes = view.nodes_by_prompt[0][["layer", "position", "neuron"]].head(20).to_numpy().tolist()
        status, body = _post(server, json.dumps({"prompt": 0, "nodes": nodes, "multiplier": 0}).encode())
        assert status == 200 and json.loads(body)["steered"] != same["steered"]
        assert loads == [1]  # loaded once
        bad = [({"prompt": 999, "cluster": cluster, "multiplier": 0}, "no prompt 999"),
               ({"prompt": 0, "cluster": 999, "multiplier": 0}, "no cluster 999"),
               ({"prompt": 0, "cluster": cluster, "multiplier": float("nan")}, "finite"),
               ({"prompt": 0, "cluster": cluster, "multiplier": 1e6}, "finite"),
               ({"prompt": 0, "cluster": cluster, "multiplier": "2"}, "finite"),
               ({"prompt": 0, "multiplier": 0}, "either"),
               ({"prompt": 0, "cluster": cluster, "nodes": nodes, "multiplier": 0}, "either"),
               ({"prompt": 0, "nodes": [[99, 0, 0]], "multiplier": 0}, "layer 99 is out of range"),
               ({"prompt": 0, "cluster": cluster, "multiplier": 0, "extra": 1}, "unknown field")]
        for request, message in bad:
            status, body = _post(server, json.dumps(request).encode())
            assert status == 400 and message in body.decode() and body.decode().count("\n") == 1, (request, body)
        for body, kind, message in [(b"{not json", "application/json", "not JSON"),
                                    (b" " * 70_000, "application/json", "over the limit"),
                                    (b'{"prompt": 0}', "text/plain", "application/json")]:
            status, answer = _post(server, body, kind)
            assert status == 400 and message in answer.decode() and answer.decode().count("\n") == 1
        assert _post(server, b"{}", host="evil.example")[0] == 403
        with chromium() as driver:  # the page's steer box, on the same server
            open_page(driver, f"http://127.0.0.1:{server.server_port}/")
            click_cluster(driver, cluster)
            driver.find_element(By.ID, "steer-multiplier").clear()
            driver.find_element(By.ID, "steer-multiplier").send_keys("0")
            driver.find_element(By.ID, "steer-run").click()
            WebDriverWait(driver, 120).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#steer-steered tr"))
            rows = driver.find_elements(By.CSS_SELECTOR, "#steer-baseline tr")
            assert len(rows) == 11 and [r.text for r in rows[1:]] != [
                r.text for r in driver.find_elements(By.CSS_SELECTOR, "#steer-steered tr")[1:]]
            assert not console_errors(driver)
    finally:
        server.shutdown()
        server.server_close()


LONG_EXCERPT = ["<|im_start|>", "system", "\n", "You", " are"] * 6 + [" the", " capital", " ", " of", "\n", " France"]


@pytest.fixture(scope="module")
def with_facts(tmp_path_factory):
    """A run whose descriptions carry the describe stage's cross-prompt facts and the excerpts its explainer saw."""
    long = LONG_EXCERPT
    path = tmp_path_factory.mktemp("facts") / "run"
    run = synthetic_run(path, prompts=3, layers=8, nodes=60, length=(30, 34), neurons=40, clusters=3, labels=LABELS)
    table = run.read_table("describe", "descriptions")
    shown = [{"prompt": 2, "part": "input+", "tokens": long, "values": [0.0] * 31 + [0.9, 0.0, 0.5, 0.0, 0.0],
              "highlight": [False] * 31 + [True, False, True, False, False]},
             {"prompt": 1, "part": "output", "tokens": [" Paris", " Rome"], "values": [1.2, -0.3],
              "highlight": [True, True]}]
    table["facts"] = [[f"fires at the last position in {c + 1} of 3 prompts", "layers 2-5"] for c in table["cluster"]]
    table["exemplars"] = json.dumps(shown)
    config = DescribeConfig.model_construct(explainer="synthetic", simulator="synthetic")
    with writing(run, DESCRIBE_STAGE, config, "synthetic") as (_, stage):
        stage.write_table("descriptions", table)
    return path


@pytest.fixture(scope="module")
def no_edges(tmp_path_factory):
    """A run whose trace found no edges."""
    path = tmp_path_factory.mktemp("no-edges") / "run"
    synthetic_run(path, prompts=2, layers=8, nodes=30, length=(10, 12), neurons=40, clusters=3, edge_density=0.0)
    return path


@pytest.mark.browser
def test_cluster_panel_shows_facts_and_compact_exemplars(with_facts, demo_like, no_edges, tmp_path):
    view = RunView.open(with_facts)
    item = next(c for c in run_payload(view, [])["clusters"] if c["id"] == 0)
    assert item["facts"] == ["fires at the last position in 1 of 3 prompts", "layers 2-5"]
    first = item["exemplars"][0]
    assert first["prompt"] == 2 and first["cut"] == [True, False]  # the system prompt is left out
    assert first["tokens"] == LONG_EXCERPT[25:]  # 6 tokens of context before the first highlighted one
    assert [t for t, h in zip(first["tokens"], first["highlight"]) if h] == [" capital", " of"]
    assert item["exemplars"][1]["part"] == "output"
    # without the describe stage's excerpts: the few largest tokens, with context, the rest cut
    values = np.r_[np.full(31, 0.5), 9.0, 0.0, 4.0, 3.0, 2.0]
    made = compact_excerpt(7, "input+", LONG_EXCERPT, values)
    assert [t for t, h in zip(made["tokens"], made["highlight"]) if h] == [" capital", " of", "\n"]
    assert made["cut"] == [True, False] and made["tokens"] == LONG_EXCERPT[25:] and made["prompt"] == 7
    without = next(c for c in run_payload(RunView.open(demo_like), [])["clusters"] if c["id"] == 0)
    assert "facts" not in without and without["exemplars"] and all("cut" in e for e in without["exemplars"])
    path, _, _ = write_report(str(with_facts), str(tmp_path / "report.html"))
    with chromium() as driver:
        set_viewport(driver, 1000, 700)
        open_page(driver, path.as_uri())
        click_cluster(driver, 0)
        assert [li.text for li in driver.find_elements(By.CSS_SELECTOR, "#facts li")] == item["facts"]
        excerpts = driver.find_elements(By.CSS_SELECTOR, "#exemplars .exemplar")
        assert excerpts[0].text.startswith("prompt 2") and "\u2423" in excerpts[0].text and "0.90" in excerpts[0].text
        assert "output" in excerpts[1].text
        counted = driver.find_element(By.ID, "members-count").text
        members = len(item["members"])
        assert counted == f"showing {min(members, 25)} of {members}"
        if members > 25:
            driver.find_element(By.ID, "show-all-members").click()
            assert driver.find_element(By.ID, "members-count").text == f"showing {members} of {members}"
            assert len(driver.find_elements(By.CSS_SELECTOR, "#members tr")) == members + 1
        assert "adag serve" in driver.find_element(By.ID, "steer-note").text
        first_excerpt = driver.find_element(By.CSS_SELECTOR, "#exemplars .exemplar")  # the panel was redrawn
        redraw(driver, first_excerpt.click)  # an exemplar opens its prompt
        assert page_state(driver)["prompt"] == 2
        assert Select(driver.find_element(By.ID, "neuron-prompt")).first_selected_option.get_attribute("value") == "2"
        driver.find_element(By.ID, "prompt-search").send_keys("no such text at all")
        options = driver.find_elements(By.CSS_SELECTOR, "#neuron-prompt option")
        assert [o.get_attribute("value") for o in options] == ["2"]  # the open prompt stays listed
        assert not console_errors(driver)
        # a run with no edges: the edge slider is off and the count says why
        bare, _, _ = write_report(str(no_edges), str(tmp_path / "bare.html"))
        open_page(driver, bare.as_uri())
        assert not driver.find_element(By.ID, "edge-weight").is_enabled()
        assert "without edges" in driver.find_element(By.ID, "neuron-count").text
        assert driver.execute_script("return window.adag.graph().edges.length") == 0


# ---- the viewer in a notebook ----

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.browser
def test_show_in_a_notebook_on_a_run_made_by_the_cli(model_dir, tmp_path):
    """adag.show on a run the CLI traced and clustered: the frame's page opens at the prompt and cluster asked
    for (read back with window.adag.state()), and graph() in Python equals window.adag.graph() in the page."""
    import adag

    run = tmp_path / "run"
    runner = CliRunner()
    for args in (["trace", "--model", str(model_dir), "--dataset", "country-capitals", "--limit", "2",
                  "--threshold", "0.05", "--out", str(run)], ["cluster", str(run), "--k", "2"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
    shown = adag.show(run, prompt=1, cluster=1)
    assert shown.state == {"prompt": 1, "cluster": 1, "pins": []}
    with pytest.raises(AdagError, match="no prompt 9"):
        adag.show(run, prompt=9)
    cell = shown.html()
    assert cell.startswith("<iframe srcdoc=") and "http://" not in cell.replace("http://www.w3.org/2000/svg", "")
    (tmp_path / "notebook.html").write_text(f"<!DOCTYPE html><html><body>{cell}</body></html>")
    with chromium() as driver:
        driver.get((tmp_path / "notebook.html").as_uri())
        driver.switch_to.frame(driver.find_element(By.TAG_NAME, "iframe"))
        WebDriverWait(driver, 60).until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready"))
        state = page_state(driver)
        assert (state["prompt"], state["cluster"]) == (1, 1)
        page = driver.execute_script("return window.adag.graph()")
        assert not console_errors(driver)
    mine = shown.graph()
    assert page["nodes"] == mine["nodes"]
    assert [e[:2] for e in page["edges"]] == [e[:2] for e in mine["edges"]]
    np.testing.assert_allclose([e[2] for e in page["edges"]], [e[2] for e in mine["edges"]], rtol=5e-3)  # 3 digits
    served = serve_in_background(str(run), embeddable=True)
    try:
        frame = adag.show(run, prompt=0, server=served).html()
        assert f'src="http://127.0.0.1:{served.server_port}/#prompt=0"' in frame
        policy = _get(served, "/").getheader("Content-Security-Policy")
        assert "frame-ancestors http://localhost:*" in policy
    finally:
        served.shutdown()
        served.server_close()


@pytest.mark.builtin
def test_example_notebook_runs(tmp_path, monkeypatch):
    """examples/viewer.ipynb, executed headless (nbclient, no network): traces, clusters, describes and shows."""
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("ADAG_EXAMPLE_RUN", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = [str(EXAMPLES.parent), os.environ.get("PYTHONPATH")]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, path)))  # the kernel imports this checkout
    notebook = nbformat.read(EXAMPLES / "viewer.ipynb", as_version=4)
    NotebookClient(notebook, timeout=900, kernel_name="python3", cwd=str(tmp_path)).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert any("<iframe srcdoc=" in o.get("data", {}).get("text/html", "") for o in outputs)
    assert RunView.open(tmp_path / "run").has("describe")
