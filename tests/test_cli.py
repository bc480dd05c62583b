"""The `adag` command end to end: every command with good options, and bad inputs that must each give
one line on stderr, exit status 2, and leave every finished file byte-identical."""

import importlib
import json
import re
import shutil
import subprocess
import sys
import urllib.request

import pytest
from typer.testing import CliRunner

from adag.cli import app
from adag.datasets import load_dataset
from adag.store import FORMAT_VERSION, RunDir
from tests.fake_openai import FakeOpenAI
from tests.test_store import snapshot
from tests.tiny import tiny_model

RUNNER = CliRunner()
PROGRESS_BAR = re.compile(r"\d+%\|.*\| \d+/\d+")  # e.g. transformers' weight-loading bar: not an error line
CLI = [sys.executable, "-c", "from adag.cli import app; app()"]


def adag(*args: str, code: int = 0):
    result = RUNNER.invoke(app, [str(a) for a in args])
    assert result.exit_code == code, (result.output, result.stderr, result.exception)
    return result


def one_line_error(*args: str, match: str = ""):
    """Run a command that must fail cleanly: exit 2, exactly one line on stderr, no traceback."""
    result = adag(*args, code=2)
    lines = [line for line in result.stderr.strip().splitlines() if not PROGRESS_BAR.search(line)]
    assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], result.stderr
    assert "Traceback" not in result.output
    return lines[0]


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
    path = tmp_path_factory.mktemp("data") / "capitals.jsonl"
    rows = [r.model_dump() | {"metadata": {"score": float(i % 3)}} for i, r in
            enumerate(load_dataset("country-capitals", limit=6).rows)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ADAG_CACHE", str(path))
        yield path


@pytest.fixture(scope="module")
def server():
    with FakeOpenAI() as fake:
        yield fake


@pytest.fixture(scope="module")
def built_run(model_dir, dataset_file, cache, server, tmp_path_factory):
    """trace -> cluster -> describe -> steer through the CLI."""
    run = tmp_path_factory.mktemp("runs") / "run"
    traced = adag("trace", "--model", model_dir, "--dataset", dataset_file, "--out", run, "--threshold", "0.03")
    assert "traced 6 prompts" in traced.stdout
    assert "clustered" in adag("cluster", run, "--k", "3").stdout
    spec = f"openai:fake@{server.url}"
    assert "described 3 clusters (0 failed)" in adag("describe", run, "--explainer", spec, "--simulator", spec,
                                                     "--samples", "1").stdout
    assert "plots in" in adag("steer", run, "--multipliers", "0,1", "--controls", "2").stdout
    return run


def test_every_stage_and_command(built_run, server, tmp_path):
    run = built_run
    spec = f"openai:fake@{server.url}"
    assert "dry run: 3 clusters" in adag("describe", run, "--explainer", spec, "--simulator", spec,
                                         "--dry-run").stdout
    assert "faithfulness" in adag("faithfulness", run, "--fractions", "0,0.5,1").stdout
    assert "pearson" in adag("correlate", run, "--field", "score").stdout
    judged = adag("judge", run, "--cluster", "0", "--question", "Is it a city?", "--judge", spec, "--samples", "1",
                  "--max-new-tokens", "3", "--multipliers", "0,1")
    assert "rate" in judged.stdout
    assert "report written to" in adag("report", run).stdout
    graph = tmp_path / "graph.json"
    adag("export", run, "--prompt", "0", "--out", graph)
    assert json.loads(graph.read_text())["nodes"]
    for stage in ("faithfulness", "correlate", "judge", "report"):
        assert RunDir.open(run).stage_done(stage) and (run / stage).is_dir()
    info = adag("info", run, "--verify").stdout
    for stage in ("trace", "cluster", "describe", "steer", "faithfulness", "correlate", "judge", "report"):
        assert f"stage    {stage:12s} done" in info
    assert "built-in" in adag("models").stdout.lower() and "country-capitals" in adag("datasets").stdout
    help_text = adag("--help").stdout
    assert "adag trace -> adag cluster -> adag info" not in help_text
    commands = help_text[help_text.index("Commands"):]
    order = [commands.index(f" {stage} ") for stage in ("trace", "cluster", "describe", "steer", "report")]
    assert order == sorted(order)


def test_serve(built_run):
    with subprocess.Popen([*CLI, "serve", str(built_run), "--port", "0"], stdout=subprocess.PIPE, text=True) as server:
        try:
            line = server.stdout.readline()
            url = line.split(" at ")[1].split()[0]
            data = json.loads(urllib.request.urlopen(url + "api/data", timeout=60).read())
            assert data["clusters"]
        finally:
            server.terminate()


def test_bad_inputs_are_one_line_and_change_nothing(built_run, monkeypatch):
    run = built_run
    before = snapshot(run)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    one_line_error("describe", run, "--explainer", "bogus:foo", match="unknown backend 'bogus:foo'")
    one_line_error("describe", run, "--explainer", "openai:gpt-4o-mini", match="OPENAI_API_KEY")
    one_line_error("steer", run, "--multipliers", ",", match="--multipliers")
    one_line_error("steer", run, "--positions", "foo", match="--positions (got 'foo')")
    one_line_error("steer", run, "--controls", "-1", match="--controls (got '-1')")
    one_line_error("steer", run, "--clusters", "99", match="no cluster [99]")
    one_line_error("cluster", run, "--k", "0", match="--k")
    one_line_error("cluster", run, "--method", "bogus", match="--method")
    one_line_error("faithfulness", run, "--fractions", "2", match="--fractions")
    one_line_error("correlate", run, "--field", "nothing", match="no prompt has metadata field 'nothing'")
    one_line_error("judge", run, "--cluster", "0", match="Missing option '--question'")
    one_line_error("export", run, "--prompt", "99", "--out", run / "x.json", match="no prompt 99")
    one_line_error("serve", run, "--port", "70000", match="--port")
    one_line_error("serve", run, "--port", "-1", match="--port")
    one_line_error("info", run / "nothing", match="is not an adag run directory")
    one_line_error("bogus", match="No such command")
    assert snapshot(run) == before


def test_a_damaged_trace_part_is_named_before_cluster_and_repaired_by_trace(built_run, model_dir, dataset_file,
                                                                           tmp_path):
    run = tmp_path / "run"
    shutil.copytree(built_run, run)
    clean = {name: RunDir.open(run).read_table("trace", name) for name in ("prompts", "nodes", "edges")}
    part = run / "trace" / "nodes" / "part-000000.parquet"
    part.write_bytes(part.read_bytes()[: part.stat().st_size // 2])
    edges = run / "trace" / "edges" / "part-000001.parquet"
    edges.write_bytes(b"")
    before = snapshot(run)
    one_line_error("cluster", run, "--k", "2", match="nodes/part-000000.parquet is damaged")
    assert snapshot(run) == before
    assert "damaged" in adag("info", run, code=1).stdout
    repaired = adag("trace", "--model", model_dir, "--dataset", dataset_file, "--out", run, "--threshold", "0.03")
    assert "2 damaged file(s)" in repaired.stderr
    again = RunDir.open(run)
    for name, table in clean.items():
        assert again.read_table("trace", name).equals(table), name
    assert again.verify(hashes=True) == [] and again.stage_done("cluster")  # same tables: nothing stale


@pytest.mark.parametrize("content, match", [
    (b"[]", "holds a JSON list"), (json.dumps({"format_version": FORMAT_VERSION}).encode(), "lacks 'adag_version'"),
    (bytes(range(256)), "is not valid JSON")])
def test_a_damaged_manifest(built_run, tmp_path, content, match):
    run = tmp_path / "run"
    shutil.copytree(built_run, run)
    (run / "manifest.json").write_bytes(content)
    one_line_error("info", run, match=match)
    one_line_error("cluster", run, match=match)


def test_trace_input_errors_come_before_any_work(model_dir, dataset_file, tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    one_line_error("trace", "--model", model_dir, "--dataset", dataset_file, "--out", a_file, match="is a file")
    one_line_error("trace", "--model", model_dir, "--dataset", dataset_file, "--out", tmp_path / "r",
                   "--n-targets", "100000", match="--n-targets 100000 is more than the model's vocabulary")
    one_line_error("trace", "--model", model_dir, "--dataset", dataset_file, "--out", tmp_path / "r", "--limit", "0",
                   match="--limit")
    assert not (tmp_path / "r").exists()


def test_a_trace_that_finished_no_batch_accepts_new_settings(model_dir, dataset_file, tmp_path, monkeypatch):
    trace_module = importlib.import_module("adag.trace.run")
    run = tmp_path / "run"
    args = ["trace", "--model", model_dir, "--dataset", dataset_file, "--out", run, "--batch-size", "3"]

    def broken(*_args, **_kwargs):
        raise RuntimeError("out of memory")

    with monkeypatch.context() as patch:
        patch.setattr(trace_module, "profiles_pass", broken)
        assert isinstance(adag(*args, "--threshold", "0.03", code=1).exception, RuntimeError)
    assert "trace" not in RunDir.open(run).manifest["stages"]
    adag(*args, "--threshold", "0.05")
    assert RunDir.open(run).stage_config("trace")["threshold"] == 0.05
    one_line_error(*args, "--threshold", "0.03", match="was traced with other settings")


HOLD = "import sys, time\nfrom adag.store import RunDir\nwith RunDir.open(sys.argv[1]).lock():\n" \
       "    print('held', flush=True)\n    time.sleep(60)\n"


def test_two_writers_one_refused_and_the_run_stays_consistent(built_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(built_run, run)
    with subprocess.Popen([sys.executable, "-c", HOLD, str(run)], stdout=subprocess.PIPE, text=True) as holder:
        try:
            assert holder.stdout.readline().strip() == "held"
            before = snapshot(run)
            line = one_line_error("cluster", run, "--k", "2", match="being written by another adag process")
            assert f"pid {holder.pid}" in line and snapshot(run) == before
        finally:
            holder.kill()
    writers = [subprocess.Popen([*CLI, "cluster", str(run), "--k", k], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True) for k in ("2", "4")]
    outcomes = [(w.wait(), w.stderr.read()) for w in writers]
    for code, stderr in outcomes:
        assert code == 0 or (code == 2 and "being written by another adag process" in stderr), stderr
    assert any(code == 0 for code, _ in outcomes)
    final = RunDir.open(run)
    clusters = final.read_table("cluster", "clusters")
    assert len(clusters) == final.stage_config("cluster")["k"] == final.entry("cluster")["clusters"]
    assert final.stage_state("describe") == "stale" and final.verify(hashes=True) == []


def test_a_damaged_description_is_redone_by_describe(built_run, server, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(built_run, run)
    clean = RunDir.open(run).read_table("describe", "descriptions")
    (run / "describe" / "descriptions" / "part-000001.parquet").write_bytes(b"")
    one_line_error("report", run, match="describe/descriptions/part-000001.parquet is damaged")
    spec = f"openai:fake@{server.url}"
    repaired = adag("describe", run, "--explainer", spec, "--simulator", spec, "--samples", "1")
    assert "1 damaged file(s)" in repaired.stderr
    assert RunDir.open(run).read_table("describe", "descriptions").equals(clean)
