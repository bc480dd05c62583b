"""The `adag` command end to end: every command with good options, and two writers at once. Bad inputs
are the rows of tests/test_faults.py."""

import json
import shutil
import subprocess
import sys
import urllib.request

import pytest
from typer.testing import CliRunner

from adag.cli import app
from adag.store import RunDir
from tests.test_faults import error_line
from tests.test_store import snapshot

pytestmark = pytest.mark.slow  # each builds a run through processes or the CLI

RUNNER = CliRunner()
CLI = [sys.executable, "-c", "from adag.cli import app; app()"]


def adag(*args: str, code: int = 0):
    result = RUNNER.invoke(app, [str(a) for a in args])
    assert result.exit_code == code, (result.output, result.stderr, result.exception)
    return result


def one_line_error(*args: str, match: str = ""):
    return error_line(RUNNER.invoke(app, [str(a) for a in args]), match)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ADAG_CACHE", str(path))
        yield path


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


def test_a_command_loads_its_stage_with_the_collector_paused_once():
    """The command that brings torch into a process imports its stage's modules with the cyclic garbage
    collector off and then freezes what they made (start-up: docs/benchmarks.md); the collector is on
    again after it, and a later command (or one in a process with torch, like this one) leaves it alone."""
    check = """
import gc
from adag.cli import first_imports_uncollected
with first_imports_uncollected():
    assert not gc.isenabled()
    import adag.trace.run
assert gc.isenabled() and gc.get_freeze_count() > 0
frozen = gc.get_freeze_count()
with first_imports_uncollected():
    assert gc.isenabled()
assert gc.get_freeze_count() == frozen
"""
    subprocess.run([sys.executable, "-c", check], check=True)
