"""The list of record of hostile and careless inputs (issue 13): one row per case, run through the CLI.

An error row must exit with status 2, print exactly one line on stderr ("error: ..." naming the
problem and the fix), print no traceback, and leave the finished results of the run it touched
byte-identical. Rows for inputs that used to give a silently wrong result assert the correct result.
Damaged-part rows spoil a copy of a finished run: every reader names the file and the command that
rewrites it, and that command repairs the run to the tables of the clean run.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from adag.cli import app
from adag.datasets import load_dataset
from adag.report.html import serve_in_background
from adag.store import MANIFEST, STAGING, RunDir
from tests.fake_openai import FakeOpenAI, reply_body
from tests.test_models import DAMAGES as MODEL_DAMAGES
from tests.test_models import HAS_ACCELERATOR, RANDOM_BYTES
from tests.test_report import _get
from tests.test_store import snapshot

RUNNER = CliRunner()
PROGRESS_BAR = re.compile(r"\d+%\|.*\| \d+/\d+")  # transformers' weight-loading bar is not a message
TRACE = "trace --model {model} --dataset {data} --out {new} --threshold 0.03 --batch-size 2"
LLM = "--explainer openai:fake@{llm} --simulator openai:fake@{llm} --samples 1 --concurrency 1"
# Describe options that keep a failing server's rows short.
FAST_FAILURE = "--retries 1 --request-timeout 1 --cluster-timeout 5"


@dataclass
class Places:
    """What a row's command can name: {model} {data} {new} {file} {run} {llm} {tmp}."""

    model: Path
    data: Path
    new: Path  # a run directory that does not exist yet
    file: Path  # an ordinary file
    run: Path  # a private copy of the finished run
    llm: str  # base URL of an LLM server
    tmp: Path
    requests: list = field(default_factory=list)  # what the LLM server of the row was sent

    def words(self, command: str) -> list[str]:
        return [word.format(**vars(self)) for word in command.split()]


@dataclass(frozen=True)
class Row:
    case: str
    command: str
    match: str  # in the error line
    prepare: Callable[[Places, contextlib.ExitStack], None] | None = None
    marks: tuple = ()
    empty_run: bool = False  # leaves {new} as a run without stages (it accepts any settings)


def cli(places: Places, command: str, code: int = 0):
    result = RUNNER.invoke(app, places.words(command))
    assert result.exit_code == code, (result.output, result.exception)
    assert "Traceback" not in result.output
    return result


def error_line(result, match: str) -> str:
    """The one line on stderr of a clean failure."""
    lines = [line for line in result.stderr.splitlines() if line.strip() and not PROGRESS_BAR.search(line)]
    assert result.exit_code == 2, (result.output, result.exception)
    assert "Traceback" not in result.output
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert match in lines[0], lines[0]
    return lines[0]


def finished(run: Path) -> dict[str, str]:
    """A run's finished files with their hashes (an unfinished attempt's staging folder aside)."""
    return {name: digest for name, digest in snapshot(run).items() if not name.startswith(STAGING)}


# Preparations: each changes the places a row's command names.

def dataset(suffix: str, content: bytes):
    def prepare(places: Places, _stack) -> None:
        places.data = places.tmp / f"data{suffix}"
        places.data.write_bytes(content)
    return prepare


def spoiled_model(damage: str):
    def prepare(places: Places, _stack) -> None:
        copy = places.tmp / "model"
        shutil.copytree(places.model, copy)
        MODEL_DAMAGES[damage][0](copy)
        places.model = copy
    return prepare


def manifest(content: bytes):
    def prepare(places: Places, _stack) -> None:
        (places.run / MANIFEST).write_bytes(content)
    return prepare


def without_env(name: str):
    def prepare(_places: Places, stack: contextlib.ExitStack) -> None:
        stack.enter_context(pytest.MonkeyPatch.context()).delenv(name, raising=False)
    return prepare


def llm_server(script: list | None = None, listen_only: bool = False):
    """An LLM endpoint that fails: a fake server replying `script`, or a socket that accepts connections
    and never answers (`listen_only`), or refuses them. The LLM cache starts empty."""
    def prepare(places: Places, stack: contextlib.ExitStack) -> None:
        stack.enter_context(pytest.MonkeyPatch.context()).setenv("ADAG_CACHE", str(places.tmp / "cache"))
        if script is not None:
            fake = stack.enter_context(FakeOpenAI(script))
            places.llm, places.requests = fake.url, fake.requests
            return
        sock = stack.enter_context(socket.socket())
        sock.bind(("127.0.0.1", 0))
        if listen_only:
            sock.listen(64)
        places.llm = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    return prepare


PROMPTS = ["What is the capital of France?", "What is the capital of Spain?"]
DOWN = [(500, {"error": {"message": "down"}})] * 40
EMPTY_CHOICES = [(200, reply_body("x") | {"choices": []})] * 40
CUT_JSON = [(200, '{"id": "x", "object": "chat.completion", "choices": [{"mess')] * 40

ERRORS = [
    # Silently wrong before: each is now an error.
    Row("trace --limit 0", TRACE + " --limit 0", "--limit (got '0')"),
    Row("trace --limit -1", TRACE + " --limit -1", "--limit (got '-1')"),
    Row("trace --limit -50", TRACE + " --limit -50", "--limit (got '-50')"),
    Row("csv unterminated quote", TRACE, "line 3: malformed quoting",
        dataset(".csv", b'prompt,asr\nA,1\n"B,2\nC,3\nD,4\n')),
    Row("csv prompt column twice", TRACE, "column 'prompt' appears more than once",
        dataset(".csv", b"prompt,asr,prompt\nA,1,B\n")),
    Row("jsonl NaN metadata", TRACE, "metadata 'asr' holds nan, not a finite number",
        dataset(".jsonl", b'{"prompt": "x", "metadata": {"asr": NaN}}\n')),
    Row("csv NaN metadata", TRACE, "column 'asr' is numeric but holds nan",
        dataset(".csv", b"prompt,asr\nA,0.5\nB,NaN\n")),
    Row("trace --threshold 2", TRACE.replace("0.03", "2"), "no node reached --threshold 2", empty_run=True),
    Row("trace --threshold inf", TRACE.replace("0.03", "inf"), "--threshold (got 'inf')"),
    Row("cluster --k 0", "cluster {run} --k 0", "--k (got '0')"),
    Row("cluster --k -3", "cluster {run} --k -3", "--k (got '-3')"),
    Row("cluster --k 100000", "cluster {run} --k 100000", "--k 100000 is more than the"),
    Row("describe --explainer embed:minilm", "describe {run} --explainer embed:minilm", "cannot be the explainer"),
    # Tracebacks before.
    Row("model dir without config.json", TRACE, "has no config.json", spoiled_model("no config")),
    Row("model config without weights", TRACE, "has config.json but no *.safetensors weights",
        spoiled_model("no weights")),
    Row("model truncated safetensors", TRACE, "model.safetensors is damaged", spoiled_model("truncated weights")),
    Row("model random-bytes safetensors", TRACE, "model.safetensors is damaged",
        spoiled_model("random-bytes weights")),
    Row("model config.json not JSON", TRACE, "config.json is not valid", spoiled_model("config not JSON")),
    Row("--device cuda", TRACE + " --device cuda", "device 'cuda'",
        marks=(pytest.mark.skipif(HAS_ACCELERATOR, reason="this machine has an accelerator"),)),
    Row("--device cuda:5", TRACE + " --device cuda:5", "device 'cuda:5'",
        marks=(pytest.mark.skipif(torch.accelerator.device_count() > 5, reason="this machine has 6 GPUs"),)),
    Row("--device banana", TRACE + " --device banana", "device 'banana'"),
    Row("bare one-word hub id", TRACE.replace("{model}", "gpt2"), "hub ids name the organisation too"),
    Row("dataset invalid UTF-8 (csv)", TRACE, "line 2: not valid UTF-8 (byte 10 is 0xe9); save the file as UTF-8",
        dataset(".csv", b"prompt\ncaf\xe9\n")),
    Row("dataset invalid UTF-8 (jsonl)", TRACE, "line 1: not valid UTF-8",
        dataset(".jsonl", b'{"prompt": "caf\xe9"}\n')),
    Row("trace --n-targets 100000", TRACE + " --n-targets 100000", "--n-targets 100000 is more than the model's"),
    Row("serve --port 70000", "serve {run} --port 70000", "--port"),
    Row("serve --port -1", "serve {run} --port -1", "--port"),
    Row("trace --out a file", TRACE.replace("{new}", "{file}"), "is a file"),
    Row("serve bad host names --host", "serve {run} --host no-such-host.invalid",
        "--host no-such-host.invalid is not a known address; use 127.0.0.1"),
    Row("serve foreign address names --host", "serve {run} --host 192.0.2.1",
        "--host 192.0.2.1 is not an address of this machine; use 127.0.0.1"),
    Row("manifest a JSON list (info)", "info {run}", "holds a JSON list", manifest(b"[]")),
    Row("manifest a JSON list (cluster)", "cluster {run}", "holds a JSON list", manifest(b"[]")),
    Row("manifest lacks keys (info)", "info {run}", "lacks 'adag_version'", manifest(b'{"format_version": 3}')),
    Row("manifest lacks keys (cluster)", "cluster {run}", "lacks 'adag_version'", manifest(b'{"format_version": 3}')),
    Row("manifest binary (info)", "info {run}", "is not valid JSON", manifest(RANDOM_BYTES)),
    Row("manifest binary (cluster)", "cluster {run}", "is not valid JSON", manifest(RANDOM_BYTES)),
    Row("manifest binary (trace resuming)", TRACE.replace("{new}", "{run}"), "is not valid JSON",
        manifest(RANDOM_BYTES)),
    # Other bad options of every command.
    Row("describe unknown backend", "describe {run} --explainer bogus:foo", "unknown backend 'bogus:foo'"),
    Row("describe without an API key", "describe {run} --explainer openai:gpt-4o-mini", "OPENAI_API_KEY",
        without_env("OPENAI_API_KEY")),
    Row("steer --multipliers ,", "steer {run} --multipliers ,", "--multipliers"),
    Row("steer --positions foo", "steer {run} --positions foo", "--positions (got 'foo')"),
    Row("steer --controls -1", "steer {run} --controls -1", "--controls (got '-1')"),
    Row("steer unknown cluster", "steer {run} --clusters 99", "no cluster [99]"),
    Row("cluster --method bogus", "cluster {run} --method bogus", "--method"),
    Row("faithfulness --fractions 2", "faithfulness {run} --fractions 2", "--fractions"),
    Row("correlate unknown field", "correlate {run} --field nothing", "no prompt has metadata field 'nothing'"),
    Row("judge without --question", "judge {run} --cluster 0", "Missing option '--question'"),
    Row("export unknown prompt", "export {run} --prompt 99 --out {tmp}/x.json", "no prompt 99"),
    Row("info on a folder that is no run", "info {tmp}", "is not an adag run directory"),
    Row("unknown command", "bogus", "No such command"),
    # LLM faults: describe fails the clusters, says how many, exits 2 and leaves them for a rerun.
    Row("describe, LLM server answers 5xx", f"describe {{run}} {LLM} {FAST_FAILURE}", "3 of 3 clusters failed",
        llm_server(DOWN)),
    Row("describe, LLM server never answers", f"describe {{run}} {LLM} {FAST_FAILURE}", "3 of 3 clusters failed",
        llm_server(listen_only=True)),
    Row("describe, LLM connection refused", f"describe {{run}} {LLM} {FAST_FAILURE}", "3 of 3 clusters failed",
        llm_server()),
    Row("describe, LLM reply with empty choices", f"describe {{run}} {LLM} {FAST_FAILURE}", "3 of 3 clusters failed",
        llm_server(EMPTY_CHOICES)),
    Row("describe, LLM reply cut mid-JSON", f"describe {{run}} {LLM} {FAST_FAILURE}", "3 of 3 clusters failed",
        llm_server(CUT_JSON)),
    Row("describe, time per cluster bounded", f"describe {{run}} {LLM} --request-timeout 600 --cluster-timeout 0.5",
        "3 of 3 clusters failed", llm_server(listen_only=True)),
]


@pytest.fixture(scope="module")
def finished_run(model_dir, dataset_file, server, tmp_path_factory):
    """trace -> cluster -> describe through the CLI, with the LLM cache in a folder of its own."""
    run = tmp_path_factory.mktemp("runs") / "run"
    places = Places(model_dir, dataset_file, run, run, run, server.url, run.parent)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ADAG_CACHE", str(tmp_path_factory.mktemp("cache")))
        cli(places, TRACE)
        cli(places, "cluster {run} --k 3")
        cli(places, "describe {run} " + LLM)
    return run


@pytest.fixture
def places(finished_run, model_dir, dataset_file, server, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    a_file = tmp_path / "a-file"
    a_file.write_text("not a run")
    return Places(model_dir, dataset_file, tmp_path / "new-run", a_file, run, server.url, tmp_path)


@pytest.mark.parametrize("row", [pytest.param(row, id=row.case, marks=row.marks) for row in ERRORS])
def test_a_bad_input_is_one_line_and_changes_nothing(row, places):
    with contextlib.ExitStack() as stack:
        if row.prepare:
            row.prepare(places, stack)
        before, file_before = finished(places.run), places.file.read_bytes()
        result = RUNNER.invoke(app, places.words(row.command))
    error_line(result, row.match)
    assert finished(places.run) == before and places.file.read_bytes() == file_before
    if row.empty_run:
        assert RunDir.open(places.new).manifest["stages"] == {} and not (places.new / STAGING).exists()
    else:
        assert not places.new.exists()


# Damaged parts of a finished run.

def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def empty(path: Path) -> None:
    path.write_bytes(b"")


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


READERS = {"cluster": "cluster {run} --k 2", "report": "report {run}", "describe": "describe {run} " + LLM,
           "export": "export {run} --prompt 0 --out {tmp}/graph.json"}
# damage: (file, how, the readers that must name it; describe does not read edges). A flipped byte keeps
# the size, which is all a reader checks (hashes are checked by `adag info --verify` and by the stage
# that rewrites the file).
PART_DAMAGES = {
    "truncated nodes part": ("trace/nodes/part-000000.parquet", truncate, ("cluster", "report", "describe", "export")),
    "zero-byte edges part": ("trace/edges/part-000000.parquet", empty, ("cluster", "report", "export")),
    "flipped byte in a nodes part": ("trace/nodes/part-000001.parquet", flip_a_byte, ()),
    "zero-byte descriptions part": ("describe/descriptions/part-000001.parquet", empty, ("report",)),
}


def damage(places: Places, case: str) -> str:
    file, spoil, _ = PART_DAMAGES[case]
    spoil(places.run / file)
    return file


@pytest.mark.parametrize("case, reader", [(case, reader) for case, (_, _, readers) in PART_DAMAGES.items()
                                          for reader in readers])
def test_a_reader_names_the_damaged_part_and_the_command_that_rewrites_it(places, case, reader):
    file = damage(places, case)
    stage = file.split("/")[0]
    before = finished(places.run)
    line = error_line(RUNNER.invoke(app, places.words(READERS[reader])), f"{places.run / file} is damaged")
    assert f"rewrite it with `{RunDir.open(places.run).entry(stage)['command']}`" in line
    assert finished(places.run) == before


@pytest.mark.parametrize("case", PART_DAMAGES)
def test_info_names_the_damaged_part(places, case):
    """`adag info` checks sizes and exits 1 naming what is damaged; with --verify it checks hashes too."""
    file = damage(places, case)
    verified = cli(places, "info {run} --verify", code=1)
    assert f"damaged  {places.run / file} is damaged" in verified.stdout and not verified.stderr
    sized = RUNNER.invoke(app, places.words("info {run}"))
    assert sized.exit_code == (0 if PART_DAMAGES[case][1] is flip_a_byte else 1), sized.output


@pytest.mark.parametrize("case", PART_DAMAGES)
def test_the_named_command_repairs_a_damaged_part_to_the_clean_tables(places, case, finished_run):
    """Rerunning the stage's own command (the one the error names) redoes the damaged part only, says so
    in one line, and gives the clean run's tables, so the stages built on it stay current."""
    stage = PART_DAMAGES[case][0].split("/")[0]
    clean = RunDir.open(places.run)
    tables = {name: clean.read_table(stage, name) for name in ("prompts", "nodes", "edges", "descriptions")
              if clean.has_table(stage, name)}
    damage(places, case)
    command = clean.entry(stage)["command"].replace(str(finished_run), str(places.run))  # names the original
    repaired = cli(places, command.removeprefix("adag "))
    warnings = [line for line in repaired.stderr.splitlines() if line.strip() and not PROGRESS_BAR.search(line)]
    assert len(warnings) == 1 and warnings[0].startswith("warning: 1 damaged file(s)"), repaired.stderr
    again = RunDir.open(places.run)
    for name, table in tables.items():
        assert again.read_table(stage, name).equals(table), name
    assert again.verify(hashes=True) == [] and again.stage_done("cluster") and again.stage_done("describe")


# Inputs that used to give a silently wrong result, now with the correct one.

@pytest.mark.parametrize("suffix, content", [
    (".csv", "prompt,score\n" + "".join(f"{p},{i}\n" for i, p in enumerate(PROMPTS))),
    (".jsonl", "".join(json.dumps({"prompt": p, "metadata": {"score": i}}) + "\n" for i, p in enumerate(PROMPTS))),
], ids=["csv", "jsonl"])
def test_a_utf8_byte_order_mark_is_skipped(places, suffix, content):
    dataset(suffix, b"\xef\xbb\xbf" + content.encode())(places, None)
    assert "traced 2 prompts" in cli(places, TRACE).stdout
    assert [row.prompt for row in load_dataset(str(places.data)).rows] == PROMPTS


def test_a_trace_refused_for_its_settings_accepts_corrected_ones(places):
    error_line(RUNNER.invoke(app, places.words(TRACE + " --n-targets 100000")), "--n-targets 100000")
    assert "traced 6 prompts" in cli(places, TRACE + " --n-targets 3").stdout


def test_a_trace_that_finished_no_batch_accepts_new_settings(places, monkeypatch):
    """The settings of a trace that failed before its first batch was written are not binding."""
    def out_of_memory(*_args, **_kwargs):
        raise RuntimeError("out of memory")

    with monkeypatch.context() as patch:
        patch.setattr(importlib.import_module("adag.trace.run"), "profiles_pass", out_of_memory)
        assert isinstance(RUNNER.invoke(app, places.words(TRACE)).exception, RuntimeError)
    assert "trace" not in RunDir.open(places.new).manifest["stages"]
    cli(places, TRACE.replace("0.03", "0.05"))
    assert RunDir.open(places.new).stage_config("trace")["threshold"] == 0.05
    error_line(RUNNER.invoke(app, places.words(TRACE)), "was traced with other settings")


def test_a_dead_llm_server_is_detected_once_and_failed_clusters_are_retried(places):
    """Every cluster fails after one request and its retry (not per cluster); the stage stays unfinished
    and the same command, once the server answers, describes them all."""
    with contextlib.ExitStack() as stack:
        llm_server(DOWN[:2])(places, stack)
        command = f"describe {{run}} {LLM} --retries 1"
        error_line(RUNNER.invoke(app, places.words(command)), "3 of 3 clusters failed")
        assert len(places.requests) == 2
        assert "described 3 clusters (0 failed)" in cli(places, command).stdout
    assert (RunDir.open(places.run).read_table("describe", "descriptions")["status"] == "ok").all()


def test_kill_during_describe_then_rerun_loses_no_cluster_and_repeats_no_cached_request(places):
    """kill -9 once a cluster is written; the same command then describes every cluster once, and every
    request it sends is new to the cache (nothing answered before the kill is asked again)."""
    shutil.rmtree(places.run / "describe")
    entry = RunDir.open(places.run).manifest
    del entry["stages"]["describe"]
    (places.run / MANIFEST).write_text(json.dumps(entry))
    cache = places.tmp / "cache"
    with FakeOpenAI() as fake:
        handler = fake.server.RequestHandlerClass
        answer = handler.do_POST
        handler.do_POST = lambda request: (time.sleep(0.1), answer(request))  # slow enough to be killed
        places.llm = fake.url
        command = places.words(f"describe {{run}} {LLM}")
        parts = places.run / STAGING / "describe" / "descriptions"
        env = os.environ | {"ADAG_CACHE": str(cache), "PYTHONPATH": str(Path(__file__).parents[1])}
        with subprocess.Popen([sys.executable, "-c", "from adag.cli import app; app()", *command], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) as process:
            while process.poll() is None and not list(parts.glob("part-*.parquet")):
                time.sleep(0.02)
            process.send_signal(signal.SIGKILL)
        assert len(list(parts.glob("part-*.parquet"))) in (1, 2), "killed with clusters left to do"
        cached, sent = _cached_replies(cache), len(fake.requests)
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("ADAG_CACHE", str(cache))
            assert "described 3 clusters (0 failed)" in cli(places, f"describe {{run}} {LLM}").stdout
        # The request in flight at the kill reaches the list late (the server waits first) and the rerun
        # asks it again (its reply was never cached): count distinct requests.
        distinct = {json.dumps(body, sort_keys=True) for body in fake.requests[sent:]}
        assert len(distinct) == _cached_replies(cache) - cached
    table = RunDir.open(places.run).read_table("describe", "descriptions")
    assert sorted(table["cluster"]) == [0, 1, 2] and (table["status"] == "ok").all()


def _cached_replies(cache: Path) -> int:
    with contextlib.closing(sqlite3.connect(cache / "llm-cache.sqlite")) as db:
        return db.execute("SELECT COUNT(*) FROM completions").fetchone()[0]


# The viewer: only this machine's names may ask, and pages are sent with the hardening headers.

@pytest.fixture(scope="module")
def viewer(finished_run):
    server = serve_in_background(str(finished_run))
    yield server
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("host", ["evil.example", "evil.example:80", "127.0.0.1.evil.example", ""])
def test_the_viewer_refuses_a_foreign_host_header(viewer, host):
    response = _get(viewer, "/api/data", host)
    assert response.status == 403 and b"prompt" not in response.read()


@pytest.mark.parametrize("header, value", [
    ("X-Content-Type-Options", "nosniff"), ("X-Frame-Options", "DENY"), ("Server", "adag"),
    ("Content-Security-Policy", "default-src 'none'"), ("Content-Security-Policy", "script-src 'sha256-")])
def test_the_viewer_sends_hardening_headers(viewer, header, value):
    response = _get(viewer, "/", f"127.0.0.1:{viewer.server_port}")
    assert response.status == 200 and value in response.getheader(header)
    assert "unsafe" not in response.getheader("Content-Security-Policy")
