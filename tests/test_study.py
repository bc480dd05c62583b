"""Studies: the per-prompt measure, correlation with multiple-comparison correction, controls matched
on the traced half-neurons, steering the clusters most correlated with the measure, and `adag run`
over a study file (every stage once, a rerun that does nothing, a changed setting that reruns only
what depends on it)."""

import copy
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from adag.cluster import ClusterConfig, cluster_run
from adag.datasets import PromptRow, encode_prompt, load_dataset
from adag.errors import AdagError
from adag.pipeline import cli_fields
from adag.report.study import study_payload
from adag.stages import STAGES, STEPS
from adag.steer import CorrelateConfig, MeasureConfig, SteerConfig, correlate, correlate_run, measure_run, steer_run
from adag.steer.controls import TracedPool, layer_control, percentile
from adag.steer.correlate import adjusted
from adag.store import MANIFEST, RunDir
from adag.study import load_study, run_study
from adag.trace import TraceConfig, trace_dataset
from adag.view import RunView
from tests.browser import chromium, console_errors, open_page
from tests.fake_openai import FakeOpenAI, reply_body
from tests.test_cli import adag, one_line_error

FIRST_TOKENS = [" P", " B", " R", " M"]  # single tokens of the tiny tokenizer, standing in for city names
SMALL_TRACE = TraceConfig(metric="logit_diff", selection="topk", top_nodes=24, aggregation="none", edges=False)


def misleading_rows(countries: int = 4) -> list[dict]:
    """The shape of the misleading-capitals study: parts in metadata, [correct, misleading] labels."""
    rows = []
    for c, country in enumerate(["France", "Germany", "Italy", "Spain", "Japan", "Peru"][:countries]):
        for framing in ("", "I am sure "):
            misleading = FIRST_TOKENS[(c + 1) % 4]
            statement = f"{framing}the capital of {country} is{misleading}. " if framing else ""
            rows.append({"prompt": f"{statement}What is the capital of {country}?", "seed_response": "Answer:",
                         "labels": [FIRST_TOKENS[c % 4], misleading],
                         "metadata": {"framing": framing.strip() or "none", "country": country}})
    return rows


@pytest.fixture(scope="module")
def dataset_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "misleading.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in misleading_rows()))
    return path


@pytest.fixture(scope="module")
def measured_run(tiny_models, dataset_file, tmp_path_factory):
    lm = tiny_models["llama"]
    path = tmp_path_factory.mktemp("run")
    trace_dataset(lm, load_dataset(str(dataset_file)), SMALL_TRACE, path, progress=False)
    cluster_run(str(path), ClusterConfig(k=4))
    return lm, path


# the measure


def test_p_correct_and_logit_diff_match_an_explicit_float64_forward(measured_run):
    lm, path = measured_run
    p_correct = measure_run(str(path), MeasureConfig(measure="p_correct", batch_size=3), lm=lm).table
    logit_diff = measure_run(str(path), MeasureConfig(measure="logit_diff", batch_size=5), lm=lm).table
    p_correct, logit_diff = p_correct.set_index("prompt"), logit_diff.set_index("prompt")
    model64 = copy.deepcopy(lm.model).double()
    for prompt, row in _rows(path):
        ids = torch.tensor([encode_prompt(lm.tokenizer, row)])
        with torch.no_grad():
            logits = model64(input_ids=ids).logits[0, -1]
        correct, misleading = (lm.tokenizer(label, add_special_tokens=False)["input_ids"][0] for label in row.labels)
        # float32 batched (left-padded) against float64 unpadded through 3 layers of width 48: logit errors of
        # order 1e-6 |logit|; 1e-4 relative leaves a wide margin on any summation order.
        assert p_correct.loc[prompt, "value"] == pytest.approx(float(logits.softmax(-1)[correct]), rel=1e-4)
        assert logit_diff.loc[prompt, "value"] == pytest.approx(float(logits[correct] - logits[misleading]),
                                                                rel=1e-4, abs=1e-5)


def _rows(path) -> list[tuple[int, PromptRow]]:
    """The traced rows with their labels, as the run recorded them."""
    prompts = RunDir.open(path).read_table("trace", "prompts")
    return [(int(p), PromptRow(prompt=t, seed_response="Answer:", labels=list(labels)))
            for p, t, labels in zip(prompts["prompt"], prompts["text"], prompts["labels"])]


def test_logit_diff_measure_is_the_traced_metric(measured_run):
    """Two code paths, one quantity: the trace's logit_diff metric and the measure."""
    lm, path = measured_run
    measured = measure_run(str(path), MeasureConfig(measure="logit_diff"), lm=lm).table.set_index("prompt")["value"]
    traced = RunDir.open(path).read_table("trace", "prompts").set_index("prompt")["metric"]
    # the same float32 forward pass in batches of other sizes: only padding and summation order differ
    assert np.allclose(measured.loc[traced.index], traced, rtol=1e-4, atol=1e-5)


def test_measure_needs_labels_and_a_question(tiny_models, tmp_path):
    lm = tiny_models["llama"]
    data = tmp_path / "unlabelled.jsonl"
    data.write_text(json.dumps({"prompt": "What is the capital of France?", "labels": [" P"]}))
    trace_dataset(lm, load_dataset(str(data)), SMALL_TRACE.model_copy(update={"metric": "labels"}), tmp_path / "run",
                  progress=False)
    with pytest.raises(AdagError, match="prompt 0 has 1 label.*needs 2"):
        measure_run(str(tmp_path / "run"), MeasureConfig(measure="logit_diff"), lm=lm)
    with pytest.raises(ValueError, match="needs --question"):
        MeasureConfig(measure="judge")
    assert not (tmp_path / "run" / "measure").exists()


def test_the_measure_is_not_called_metric():
    """`metric` is the trace's m(x); the measure's choice is `measure`, and the key older runs and study
    files used for it still reads as the same setting."""
    assert "metric" not in MeasureConfig.model_fields and "metric" in TraceConfig.model_fields
    assert MeasureConfig.model_validate({"metric": "logit_diff"}) == MeasureConfig(measure="logit_diff")
    assert MeasureConfig(measure="p_top").model_dump()["measure"] == "p_top"


def test_judge_measure_is_the_yes_rate_per_prompt(measured_run, tmp_path, monkeypatch):
    lm, path = measured_run
    monkeypatch.setenv("ADAG_CACHE", str(tmp_path))
    prompts = len(RunDir.open(path).read_table("trace", "prompts"))
    answers = ["Yes", "no", "yes", "Maybe"] * prompts  # two samples per prompt, answered in order
    with FakeOpenAI([(200, reply_body(a)) for a in answers]) as server:
        table = measure_run(str(path), MeasureConfig(measure="judge", question="Is the answer a city?", samples=2,
                                                     max_new_tokens=3, judge=f"openai:fake@{server.url}"), lm=lm).table
    assert len(table) == prompts and set(table.columns) >= {"prompt", "value", "yes", "no", "unclear"}
    assert (table["yes"] + table["no"] + table["unclear"] == 2).all()
    rates = table["yes"] / (table["yes"] + table["no"])
    assert np.allclose(table["value"].dropna(), rates.dropna())

    with FakeOpenAI() as server:  # steering a judged measure: generations under the intervention, judged
        config = MeasureConfig(measure="judge", question="Is the answer a city?", samples=2, max_new_tokens=3,
                               judge=f"openai:fake@{server.url}")
        unsteered = measure_run(str(path), config, lm=lm).table.set_index("prompt")["value"]
        run = steer_run(str(path), SteerConfig(clusters=[0], multipliers=[0, 1], controls=1, control_kinds=["layer"]),
                        lm=lm, progress=False).run
    results = run.read_table("steer", "results")
    same = results[results["multiplier"] == 1].set_index("prompt")["measure"]
    assert np.allclose(same, unsteered.loc[same.index], equal_nan=True)
    assert results.loc[results["multiplier"] == 0, "measure"].between(0, 1).all()
    assert len(run.read_table("steer", "control_draws")) == 1


# correlation


def test_benjamini_hochberg_against_the_definition():
    rng = np.random.default_rng(0)
    p = np.concatenate([rng.uniform(0, 0.01, 5), rng.uniform(0, 1, 15), [np.nan]])
    q = adjusted(p)
    tested = p[:-1]
    order = np.argsort(tested)
    m = len(tested)
    expected = np.empty(m)  # q_(i) = min over j >= i of p_(j) * m / j, capped at 1
    expected[order] = np.minimum(1, np.minimum.accumulate((tested[order] * m / np.arange(1, m + 1))[::-1])[::-1])
    assert np.allclose(q[:-1], expected) and np.isnan(q[-1])


def test_correlation_table_is_corrected_and_sorted():
    prompts = pd.Index(range(12))
    values = pd.Series(np.arange(12, dtype=float), index=prompts)
    rng = np.random.default_rng(1)
    rows = [{"prompt": p, "cluster": 0, "attribution": 2.0 * p + rng.normal(0, 0.1)} for p in prompts]
    rows += [{"prompt": p, "cluster": c, "attribution": rng.normal()} for c in (1, 2, 3) for p in prompts]
    table = correlate(pd.DataFrame(rows), values, method="spearman", alpha=0.05)
    assert table["cluster"].iloc[0] == 0 and bool(table["significant"].iloc[0])
    assert (table["spearman_q"] >= table["spearman_p"]).all()
    assert table["spearman_p"].is_monotonic_increasing


def test_correlate_reads_the_measure_and_steer_takes_the_top_clusters(measured_run):
    lm, path = measured_run
    measure_run(str(path), MeasureConfig(measure="p_correct"), lm=lm)
    table = correlate_run(str(path), CorrelateConfig(method="spearman")).table
    assert (table["field"] == "measure").all()
    top = table.loc[table["spearman"].abs().sort_values(ascending=False, kind="stable").index, "cluster"][:2]
    run = steer_run(str(path), SteerConfig(top=2, multipliers=[0, 1, 2], controls=3,
                                           control_kinds=["traced", "layer"]), lm=lm, progress=False).run
    summary = run.read_table("steer", "summary")
    assert set(summary["cluster"]) == set(top)
    measured = run.read_table("measure", "values")["value"].mean()
    assert np.allclose(summary.loc[summary["multiplier"] == 1, "measure"], measured, rtol=1e-6)
    controls = run.read_table("steer", "controls")
    assert len(controls) == 2 * 2 * 2  # clusters x kinds x steered multipliers (1 steers nothing)
    assert set(controls["kind"]) == {"traced", "layer"} and set(controls["multiplier"]) == {0, 2}
    assert np.allclose(controls["baseline"], measured, rtol=1e-6)
    draws = run.read_table("steer", "control_draws")
    assert len(draws) == 2 * 2 * 2 * 3
    again = steer_run(str(path), SteerConfig(top=2, multipliers=[0, 1, 2], controls=3,
                                             control_kinds=["layer", "traced"]), lm=lm, progress=False).run
    by_kind = again.read_table("steer", "controls").set_index(["cluster", "kind", "multiplier"]).sort_index()
    assert np.allclose(by_kind["control_mean"], controls.set_index(["cluster", "kind", "multiplier"])
                       .sort_index()["control_mean"])  # a kind's draws do not depend on the other kinds


def test_steer_top_needs_correlate(measured_run, tmp_path):
    lm, _ = measured_run
    fresh = tmp_path / "fresh"
    trace_dataset(lm, load_dataset("country-capitals", limit=2), SMALL_TRACE.model_copy(update={"metric": "topk"}),
                  fresh, progress=False)
    cluster_run(str(fresh), ClusterConfig(k=2))
    with pytest.raises(AdagError, match="no finished 'correlate' stage"):
        steer_run(str(fresh), SteerConfig(top=1), lm=lm, progress=False)
    assert study_payload(RunView.open(fresh)) is None  # and the report has no study section
    with pytest.raises(ValueError, match="not both"):
        SteerConfig(top=1, clusters=[0])


# controls


def _pool(layers: int = 3, per_layer: int = 40, bins: int = 4) -> tuple[TracedPool, pd.DataFrame]:
    rng = np.random.default_rng(0)
    table = pd.DataFrame([{"layer": layer, "neuron": n, "polarity": 1 if n % 3 else -1,
                           "magnitude": float(rng.exponential(1 + layer))}
                          for layer in range(layers) for n in range(per_layer)])
    return TracedPool(table, bins, n_neurons=100), table


def test_traced_controls_match_layer_and_attribution_bin():
    pool, _ = _pool()
    members = pool.keys[::7][:12]
    bin_of = {key: (int(pool.layer[i]), int(pool.bin[i])) for i, key in enumerate(pool.keys)}
    for seed in range(5):
        control, unmatched = pool.draw(members, np.random.default_rng(seed))
        assert unmatched == 0 and len(control) == len(set(control)) == len(members)
        assert not set(control) & set(members)
        assert sorted(bin_of[h] for h in control) == sorted(bin_of[h] for h in members)
    assert pool.draw(members, np.random.default_rng(3)) == pool.draw(members, np.random.default_rng(3))


def test_bins_are_equal_count_quantiles_within_each_layer():
    pool, table = _pool(per_layer=40, bins=4)
    for layer in range(3):
        in_layer = pool.layer == layer
        assert np.bincount(pool.bin[in_layer]).tolist() == [10, 10, 10, 10]
        keys = [pool.keys[i] for i in np.flatnonzero(in_layer)]
        magnitude = table.set_index(["layer", "neuron", "polarity"]).loc[keys, "magnitude"].to_numpy()
        assert (np.diff(pool.bin[in_layer][np.argsort(magnitude)]) >= 0).all()  # bins follow |attribution|


def test_traced_controls_fall_back_when_a_cell_or_the_pool_runs_out():
    pool, _ = _pool(layers=2, per_layer=8, bins=2)
    crowded = [pool.keys[i] for i in np.flatnonzero((pool.layer == 0) & (pool.bin == 1))]
    control, unmatched = pool.draw(crowded, np.random.default_rng(0))  # the whole cell is the cluster
    assert unmatched == len(crowded) and len(set(control)) == len(crowded)
    assert all(h[0] == 0 for h in control)  # the same layer's other bin comes before other layers
    everything = pool.keys[:14]  # more than the 2 left in the pool
    control, unmatched = pool.draw(everything, np.random.default_rng(0))
    assert len(set(control)) == 14 and not set(control) & set(everything) and unmatched > 0


def test_layer_controls_and_percentiles():
    members = [(0, 3, 1), (0, 5, -1), (2, 1, 1)]
    control = layer_control(members, 50, np.random.default_rng(0))
    assert sorted((h[0], h[2]) for h in control) == sorted((h[0], h[2]) for h in members)
    assert percentile(1.0, np.array([0.0, 1.0, 2.0, 3.0])) == pytest.approx(37.5)
    assert percentile(5.0, np.array([0.0, 1.0])) == 100 and percentile(-1.0, np.array([0.0])) == 0


# studies: adag run


def write_study(path: Path, model_dir, dataset_file, server, out: Path, k: int = 3, measure: str = "p_correct",
                extra: str = "") -> Path:
    spec = f"openai:fake@{server.url}"
    path.write_text(f"""
model = "{model_dir}"
dataset = "{dataset_file}"
out = "{out}"

[trace]
metric = "logit_diff"
selection = "topk"
top_nodes = 24
aggregation = "none"
edges = false

[cluster]
k = {k}

[describe]
explainer = "{spec}"
simulator = "{spec}"
samples = 1

[measure]
measure = "{measure}"

[correlate]

[steer]
top = 2
multipliers = [0, 1, 2]
controls = 2
control_kinds = ["traced", "layer"]

[report]
{extra}""")
    return path


def _entries(out: Path) -> dict[str, tuple]:
    manifest = json.loads((out / MANIFEST).read_text())
    return {stage: (entry["id"], entry["started"]) for stage, entry in manifest["stages"].items()}


@pytest.mark.slow
def test_a_study_runs_every_stage_once_and_reruns_only_what_a_change_touches(model_dir, dataset_file, server,
                                                                           tmp_path, monkeypatch):
    monkeypatch.setenv("ADAG_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "study"
    study = write_study(tmp_path / "study.toml", model_dir, dataset_file, server, out)
    stages = ["trace", "cluster", "describe", "measure", "correlate", "steer", "report"]

    first = adag("run", study).stdout
    assert all(f"] {stage}: done" in first for stage in stages)
    assert "clusters correlate significantly with measure" in first and "among traced" in first
    run = RunDir.open(out)
    assert [s for s in run.manifest["stages"]] == stages and all(run.stage_done(s) for s in stages)

    before = (out / MANIFEST).read_bytes()
    again = run_study(study, echo=lambda line: None)
    assert not any(outcome.ran for outcome in again) and (out / MANIFEST).read_bytes() == before

    entries = _entries(out)
    write_study(study, model_dir, dataset_file, server, out, k=4)
    changed = {outcome.stage for outcome in run_study(study, echo=lambda line: None) if outcome.ran}
    assert changed == {"cluster", "describe", "correlate", "steer", "report"}
    after = _entries(out)
    assert after["trace"] == entries["trace"] and after["measure"] == entries["measure"]

    entries = after
    write_study(study, model_dir, dataset_file, server, out, k=4, measure="logit_diff")
    changed = {outcome.stage for outcome in run_study(study, echo=lambda line: None) if outcome.ran}
    assert changed == {"measure", "correlate", "steer", "report"}
    assert all(_entries(out)[s] == entries[s] for s in ("trace", "cluster", "describe"))
    assert all(RunDir.open(out).stage_done(s) for s in stages)


@pytest.mark.slow
def test_an_interrupted_study_resumes_at_the_stage_that_failed(model_dir, dataset_file, server, tmp_path,
                                                                 monkeypatch):
    monkeypatch.setenv("ADAG_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "study"
    study = write_study(tmp_path / "study.toml", model_dir, dataset_file, server, out)

    def broken(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr("adag.steer.run.steer_run", broken)
        with pytest.raises(KeyboardInterrupt):
            run_study(study, echo=lambda line: None)
    assert not RunDir.open(out).stage_done("steer") and RunDir.open(out).stage_done("correlate")
    resumed = [outcome.stage for outcome in run_study(study, echo=lambda line: None) if outcome.ran]
    assert resumed == ["steer", "report"]


def test_study_files_are_checked_before_any_work(model_dir, dataset_file, server, tmp_path):
    out = tmp_path / "never"
    good = write_study(tmp_path / "good.toml", model_dir, dataset_file, server, out).read_text()
    cases = [
        (good + "\nbogus = 1\n", "[report] unknown key 'bogus'; known keys: prompts"),
        ("colour = 'red'\n" + good, "unknown key 'colour'; known keys: model, dataset, out"),
        (good.replace("k = 3", "k = 'many'"), "[cluster] k (got 'many')"),
        (good.replace("controls = 2", "controls = -2"), "[steer] controls (got -2): input should be greater"),
        (good.replace("[correlate]\n", ""), "[steer] needs the correlate stage; add a [correlate] table"),
        (good.replace("[measure]\nmeasure = \"p_correct\"\n", ""), "[correlate] needs the measure stage"),
        (good.replace("model = ", "model = = "), "is not valid TOML"),
        ("report = 3\n" + good.replace("[report]", ""), "'report' must be a table"),
        (good.replace(f'model = "{model_dir}"\n', ""), "model: field required"),
    ]
    for number, (text, match) in enumerate(cases):
        path = tmp_path / f"bad-{number}.toml"
        path.write_text(text)
        line = one_line_error("run", path, match=match)
        assert str(path) in line
    one_line_error("run", tmp_path / "missing.toml", match="no study file")
    assert not out.exists()
    assert list(load_study(tmp_path / "good.toml").configs) == ["trace", "cluster", "describe", "measure",
                                                                "correlate", "steer", "report"]


def test_a_study_takes_only_stages_that_write_into_the_run(model_dir, dataset_file, server, tmp_path):
    """A command that writes a file elsewhere (export, figure: generated from the registry) is refused
    as a study table with one line, before any work; every stage a study may run needs no option
    beyond its settings, so no study can fail for a missing one once it has started."""
    out = tmp_path / "never"
    good = write_study(tmp_path / "good.toml", model_dir, dataset_file, server, out).read_text()
    commands = [name for name, stage in STAGES.items() if not stage.writes]
    assert commands and set(commands).isdisjoint(STEPS)
    for name in commands:
        path = tmp_path / f"with-{name}.toml"
        path.write_text(good + f"\n[{name}]\n")
        line = one_line_error("run", path, match=f"[{name}] is a command that writes a file outside the run")
        assert str(path) in line and f"adag {name}" in line
    assert not out.exists()
    for name in STEPS:
        stage = STAGES[name]
        required = [field for field, info in cli_fields(stage.options).items()
                    if info.is_required() and field != stage.run_dir_option]
        assert not required, f"{name} needs options a study cannot give: {required}"


def test_a_study_refuses_a_run_of_another_dataset(model_dir, dataset_file, server, tmp_path, monkeypatch):
    monkeypatch.setenv("ADAG_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "study"
    study = write_study(tmp_path / "study.toml", model_dir, dataset_file, server, out)
    study.write_text(study.read_text().replace("[cluster]", "[x]").split("[x]")[0])  # trace only
    run_study(study, echo=lambda line: None)
    other = tmp_path / "other.jsonl"
    other.write_text("\n".join(json.dumps(row) for row in misleading_rows(countries=3)))
    study.write_text(study.read_text().replace(str(dataset_file), str(other)))
    one_line_error("run", study, match="holds a run of another dataset")


@pytest.mark.parametrize("example", sorted(Path(__file__).parent.parent.glob("examples/*.toml")))
def test_the_examples_are_valid_studies(example):
    study = load_study(example)
    assert list(study.configs)[:2] == ["trace", "cluster"] and "steer" in study.configs


# the report's study section


@pytest.fixture(scope="module")
def studied(model_dir, dataset_file, server, tmp_path_factory):
    """A tiny study run through every stage, report included."""
    folder = tmp_path_factory.mktemp("studied")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ADAG_CACHE", str(folder / "cache"))
        run_study(write_study(folder / "study.toml", model_dir, dataset_file, server, folder / "run"),
                  echo=lambda line: None)
    return folder / "run"


@pytest.mark.slow
def test_study_section_data_is_the_runs_tables(studied):
    view = RunView.open(studied)
    section = study_payload(view)
    correlation = view.table("correlate", "correlation")
    assert [r["cluster"] for r in section["correlations"]] == correlation["cluster"].tolist()
    assert [r["q"] for r in section["correlations"]] == correlation["pearson_q"].tolist()
    assert section["significant"] == int(correlation["significant"].sum())
    assert section["measure_label"] == "P(correct answer)"
    values = view.table("measure", "values")
    assert [v["value"] for v in section["values"]] == values["value"].tolist()
    framing = {m["framing"] for m in (r["metadata"] for r in misleading_rows())}
    by_framing = next(p for p in section["parts"] if p["part"] == "framing")
    assert {v["value"] for v in by_framing["values"]} == framing and {v["count"] for v in by_framing["values"]} == {4}
    texts = view.prompt_text
    sure = [v["value"] for v in section["values"] if texts[v["prompt"]].startswith("I am sure")]
    assert next(v["mean"] for v in by_framing["values"] if v["value"] == "I am sure") == pytest.approx(np.mean(sure))

    summary, draws = view.table("steer", "summary"), view.table("steer", "control_draws")
    assert [s["cluster"] for s in section["steered"]] == list(dict.fromkeys(summary["cluster"]))
    for steered in section["steered"]:
        sweep = {r["multiplier"]: r["measure"] for r in steered["sweep"]}
        assert sweep[1.0] == pytest.approx(values["value"].mean(), rel=1e-6)  # x1 steers nothing
        assert {(r["kind"], r["multiplier"]) for r in steered["controls"]} == {(k, m) for k in ("traced", "layer")
                                                                             for m in (0.0, 2.0)}
        for row in steered["controls"]:
            assert row["change"] == pytest.approx(sweep[row["multiplier"]] - sweep[1.0], abs=1e-9)
            mine = draws[(draws["cluster"] == steered["cluster"]) & (draws["kind"] == row["kind"])
                         & (draws["multiplier"] == row["multiplier"])]["change"].to_numpy()
            assert len(mine) == row["controls"] == 2
            assert row["percentile"] == percentile(row["change"], mine)
            assert mine.min() <= row["control_low"] <= row["control_high"] <= mine.max()
        assert steered["plot"].startswith("data:image/png;base64,")
    described = {d["cluster"] for d in section["descriptions"]}
    assert {r["cluster"] for r in section["correlations"][:5]} | {s["cluster"] for s in section["steered"]} == described


@pytest.mark.browser
def test_study_section_in_the_report(studied, tmp_path):
    path = studied / "report" / "report.html"
    view = RunView.open(studied)
    section = study_payload(view)
    with chromium() as driver:
        open_page(driver, path.as_uri())
        assert driver.find_element(By.ID, "study-section").is_displayed()
        summary = driver.find_element(By.ID, "study-summary").text
        assert summary.startswith(f"{section['significant']} of {len(section['correlations'])} clusters correlate")
        rows = driver.find_elements(By.CSS_SELECTOR, "#study-correlations tr")[1:]
        assert [int(r.find_element(By.TAG_NAME, "td").text) for r in rows] == [c["cluster"]
                                                                              for c in section["correlations"]]
        significant = driver.find_elements(By.CSS_SELECTOR, "#study-correlations tr.significant")
        assert len(significant) == section["significant"]
        parts = driver.find_elements(By.CSS_SELECTOR, "#study-parts tr")[1:]
        assert len(parts) == sum(len(p["values"]) for p in section["parts"])
        for steered in section["steered"]:
            table = driver.find_elements(By.CSS_SELECTOR, f"#study-steer-{steered['cluster']} tr")[1:]
            assert sorted(r.find_elements(By.TAG_NAME, "td")[1].text for r in table) == ["layer", "layer", "traced",
                                                                                        "traced"]
        assert len(driver.find_elements(By.CSS_SELECTOR, "#study-section img")) == len(section["steered"])
        assert len(driver.find_elements(By.CSS_SELECTOR, "#study-values tr")) == len(section["values"]) + 1
        last = section["correlations"][-1]
        driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", rows[-1])
        rows[-1].click()
        WebDriverWait(driver, 10).until(lambda d: d.find_element(By.ID, "panel-label").text == last["label"])
        assert not console_errors(driver)
        driver.save_screenshot(str(tmp_path / "study.png"))

