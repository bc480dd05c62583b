"""The list of record of hostile and careless inputs (issue 13): one row per case, run through the CLI.

An error row must exit with status 2, print exactly one line on stderr ("error: ..." naming the
problem and the fix), print no traceback, and leave the finished results of the run it touched
byte-identical. Rows for inputs that used to give a silently wrong result assert the correct result.
Damaged-part rows spoil a copy of a finished run: every reader names the file and the command that
rewrites it, and that command repairs the run to the tables of the clean run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import os
import re
import shlex
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
from adag.outputs import OutputPath
from adag.pipeline import cli_fields, option_name
from adag.report.html import make_server, serve_in_background
from adag.stages import STAGES
from adag.store import MANIFEST, STAGING, RunDir
from tests.fake_openai import FakeOpenAI, cooperative, reply_body
from tests.permissions import permissions_can_be_enforced, permissions_enforced
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

NEEDS_PERMISSIONS = pytest.mark.skipif(not permissions_can_be_enforced(),
                                       reason="file permissions cannot be enforced on this system")


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


def llm_server(script: list | None = None, listen_only: bool = False, respond: Callable[[str], str] | None = None):
    """An LLM endpoint that fails: a fake server replying `script` (then `respond`ing), or a socket that
    accepts connections and never answers (`listen_only`), or refuses them. The LLM cache starts empty."""
    def prepare(places: Places, stack: contextlib.ExitStack) -> None:
        stack.enter_context(pytest.MonkeyPatch.context()).setenv("ADAG_CACHE", str(places.tmp / "cache"))
        if script is not None or respond is not None:
            fake = stack.enter_context(FakeOpenAI(script, respond or cooperative))
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


def symlink(name: str, to: str):
    """{tmp}/NAME, a symbolic link to {run} (to="run") or to one of its files (to="run/FILE")."""
    def prepare(places: Places, _stack) -> None:
        (places.tmp / name).symlink_to(places.run / to.removeprefix("run").lstrip("/"))
    return prepare


def judge_replies(reply: str) -> Callable[[str], str]:
    """A cooperative LLM whose every judge answer is `reply`."""
    return lambda text: reply if "Answer with yes or no only" in text else cooperative(text)


def simulator_replies(value: str) -> Callable[[str], str]:
    """A cooperative LLM whose simulator lists hold `value` (e.g. NaN) for every item."""
    def respond(text: str) -> str:
        wanted = re.search(r"JSON list of (\d+) integers", text)
        return f"[{', '.join([value] * int(wanted.group(1)))}]" if wanted else cooperative(text)
    return respond


INSIDE = "is inside the run directory"
EXPORT = "export {run} --prompt 0 --out "
JUDGE = "--judge openai:fake@{llm} --question Harmful? --samples 1 --max-new-tokens 2"
# Issue 23: nothing lost at the edges. Classes: 1 output paths, 3 numbers, 4 useless replies, 7 serve, 9 options.
ERRORS += [
    Row("report --out the manifest", "report {run} --out {run}/manifest.json", INSIDE),
    Row("report --out the run's own report", "report {run} --out {run}/report/report.html", INSIDE),
    Row("export --out the manifest", EXPORT + "{run}/manifest.json", INSIDE),
    Row("export --out a trace part", EXPORT + "{run}/trace/nodes/part-000000.parquet", INSIDE),
    Row("export --out a new file in a stage folder", EXPORT + "{run}/cluster/graph.json", INSIDE),
    Row("export --out through ..", EXPORT + "{run}/trace/nodes/../../manifest.json", INSIDE),
    Row("export --out through a symlinked folder", EXPORT + "{tmp}/link/describe/ledger.parquet", INSIDE,
        symlink("link", "run")),
    Row("export --out a symlink to a run file", EXPORT + "{tmp}/link.json", INSIDE,
        symlink("link.json", "run/manifest.json")),
    Row("figure --out into a stage folder", "figure {run} --prompt 0 --out {run}/steer/plots/overview.png", INSIDE),
    Row("figure --clusters --out the manifest", "figure {run} --clusters --out {run}/manifest.json", INSIDE),
    Row("trace --out inside a run", TRACE.replace("{new}", "{run}/trace/again"), INSIDE),
    Row("trace --out a folder of a run", TRACE.replace("{new}", "{run}/cluster"), INSIDE),
    Row("export --out a directory", EXPORT + "{tmp}", "is a directory"),
    Row("figure --out a directory", "figure {run} --prompt 0 --out {tmp}", "is a directory"),
    Row("export --out empty", EXPORT.replace("--out ", "--out="), "the output path is empty"),
    Row("report --out empty", "report {run} --out=", "the output path is empty"),
    Row("export --out under a regular file", EXPORT + "{file}/graph.json", "is a file, so nothing can be written"),
    Row("report --out under a regular file", "report {run} --out {file}/sub/r.html", "is a file, so nothing"),
    Row("export --out x.svg", EXPORT + "{tmp}/graph.svg", "give a file name ending in .json"),
    Row("report --out x.json", "report {run} --out {tmp}/r.json", "give a file name ending in .html"),
    Row("figure --out x.json", "figure {run} --prompt 0 --out {tmp}/f.json", "give a file name ending in .svg"),
    Row("steer --multipliers nan", "steer {run} --multipliers nan", "--multipliers (got 'nan')"),
    Row("steer --multipliers inf", "steer {run} --multipliers 0,inf", "finite number"),
    Row("steer --multipliers -inf", "steer {run} --multipliers -inf", "finite number"),
    Row("steer --multipliers 1e308", "steer {run} --multipliers 1e308", "less than or equal to 1000"),
    Row("judge --multipliers nan", "judge {run} --cluster 0 --question Harmful? --multipliers nan", "--multipliers"),
    Row("judge --multipliers -1e308", "judge {run} --cluster 0 --question Harmful? --multipliers -1e308",
        "greater than or equal to -1000"),
    Row("cluster --seed -1", "cluster {run} --seed -1", "--seed (got '-1')"),
    Row("cluster --seed 2**32", "cluster {run} --seed 4294967296", "less than or equal to 4294967295"),
    Row("describe --seed -1", "describe {run} --seed -1", "--seed"),
    Row("steer --seed 2**40", "steer {run} --seed 1099511627776", "--seed"),
    Row("measure --seed -5", "measure {run} --seed -5", "--seed"),
    Row("steer --controls 10**30", "steer {run} --controls " + "1" + "0" * 30, "is too large"),
    Row("describe --temperature nan", "describe {run} --temperature nan", "--temperature"),
    Row("describe --request-timeout 1e308", "describe {run} --request-timeout 1e308", "--request-timeout"),
    Row("describe --cluster-timeout inf", "describe {run} --cluster-timeout inf", "--cluster-timeout"),
    Row("trace --edge-threshold nan", TRACE + " --edge-threshold nan", "--edge-threshold"),
    Row("faithfulness --fractions nan", "faithfulness {run} --fractions nan", "--fractions"),
    Row("correlate --alpha nan", "correlate {run} --alpha nan", "--alpha"),
    Row("figure --share nan", "figure {run} --prompt 0 --share nan --out {tmp}/f.png", "--share"),
    Row("figure --min-weight inf", "figure {run} --prompt 0 --min-weight inf --out {tmp}/f.png", "--min-weight"),
    Row("report --prompts 1 --prompt-ids 0", "report {run} --prompts 1 --prompt-ids 0", "not both"),
    Row("report --prompts 50 --prompt-ids 0,1", "report {run} --prompts 50 --prompt-ids 0,1", "not both"),
    Row("figure --prompt and --clusters", "figure {run} --prompt 0 --clusters --out {tmp}/f.png", "either --prompt"),
    Row("figure --clusters --supernodes", "figure {run} --clusters --supernodes --out {tmp}/f.png",
        "--supernodes would be ignored"),
    Row("figure --clusters --share", "figure {run} --clusters --share 0.5 --out {tmp}/f.png", "--share would be"),
    Row("steer --control-bins without --controls", "steer {run} --control-bins 3", "--control-bins would be ignored"),
    Row("steer --clusters and --top", "steer {run} --clusters 0 --top 1", "not both"),
    Row("trace --aggregate-over without aggregation", TRACE + " --aggregation none --aggregate-over dataset",
        "--aggregate-over would be ignored"),
    Row("serve --host empty", "serve {run} --host=", "--host is empty"),
    Row("serve --host blank", "serve {run} --host", "--host"),
    Row("describe, simulator replies NaN", "describe {run} --explainer stats --simulator openai:fake@{llm}",
        "3 of 3 clusters failed", llm_server(respond=simulator_replies("NaN"))),
    Row("describe, simulator replies Infinity", "describe {run} --explainer stats --simulator openai:fake@{llm}",
        "3 of 3 clusters failed", llm_server(respond=simulator_replies("Infinity"))),
    Row("judge refuses everything", "judge {run} --cluster 0 --multipliers 0,1 " + JUDGE,
        "answered neither yes nor no", llm_server(respond=judge_replies("I cannot help with that."))),
    Row("judge answers nothing", "judge {run} --cluster 1 " + JUDGE, "answered neither yes nor no",
        llm_server(respond=judge_replies(""))),
    Row("measure with a judge that refuses everything", "measure {run} --measure judge " + JUDGE,
        "no prompt has a judge value", llm_server(respond=judge_replies("Sorry, as an AI I cannot."))),
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
    assert f"rewrite it with `{RunDir.open(places.run).command(stage)}`" in line
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
    command = clean.command(stage)  # names this copy of the run, not the run it was copied from
    assert str(places.run) in command and str(finished_run) not in command
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
        patch.setattr(importlib.import_module("adag.trace.attribute"), "profiles_pass", out_of_memory)
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


# Issue 23, class 1: for every command and every path-valued option (found in the stage registry, not
# listed here), a path inside a run is refused and changes nothing.

def output_options() -> list[tuple[str, str, OutputPath]]:
    """(command, field, marker) of every field declared with OutputPath in a stage's settings models."""
    return [(stage.name, name, marker) for stage in STAGES.values() for model in (stage.config, stage.options)
            for name, spec in cli_fields(model).items() for marker in spec.metadata
            if isinstance(marker, OutputPath)]


def test_every_output_option_is_found():
    assert {(command, name) for command, name, _ in output_options()} >= {
        ("trace", "out"), ("report", "out"), ("export", "out"), ("figure", "out")}


def targets_inside(run: Path, formats: tuple[str, ...]) -> list[str]:
    """Paths that resolve into `run`: every managed file (and one new file beside it, named for the
    format), the same through `..` and through a symlinked folder."""
    manifest = RunDir.open(run).manifest
    files = [MANIFEST, *(f"{stage}/{file}" for stage, entry in manifest["stages"].items()
                         for file in entry["files"])]
    link = run.parent / "link-to-run"
    link.symlink_to(run)
    paths = []
    for file in files[::3]:  # every third file: all kinds of file, a bounded number of commands
        paths += [str(run / file), str(run / (file + (formats[0] if formats else ""))),
                  str(run / file.split("/")[0] / ".." / file), str(link / file)]
    return paths


@pytest.mark.parametrize("command, name, marker", output_options(), ids=lambda v: getattr(v, "name", str(v)))
def test_an_output_path_inside_a_run_is_refused_and_changes_nothing(places, command, name, marker):
    stage = STAGES[command]
    words = [command] if stage.run_dir_option else [command, str(places.run)]
    for model in (stage.config, stage.options):  # a value for every other required option
        for other, spec in cli_fields(model).items():
            if spec.is_required() and other != name:
                words += [option_name(other), "0" if spec.annotation is int else "x"]
    before = finished(places.run)
    for target in targets_inside(places.run, marker.formats):
        error_line(RUNNER.invoke(app, [*words, option_name(name), target]), INSIDE)
    assert finished(places.run) == before


def test_a_study_out_inside_a_run_is_refused(places):
    study = places.tmp / "study.toml"
    study.write_text(f'model = "{places.model}"\ndataset = "{places.data}"\nout = "{places.run}/trace/nested"\n')
    before = finished(places.run)
    error_line(RUNNER.invoke(app, ["run", str(study)]), INSIDE)
    assert finished(places.run) == before


def test_a_tilde_in_an_output_path_is_the_home_folder(places, monkeypatch):
    monkeypatch.setenv("HOME", str(places.tmp))
    assert "graph written to" in cli(places, "export {run} --prompt 0 --out=~/exported/graph.json").stdout
    assert json.loads((places.tmp / "exported" / "graph.json").read_text())["nodes"]
    assert not Path("~").exists()


@NEEDS_PERMISSIONS
def test_an_output_folder_without_permission_is_one_line(places):
    locked = places.tmp / "locked"
    locked.mkdir(mode=0o500)
    with permissions_enforced():
        result = RUNNER.invoke(app, places.words("export {run} --prompt 0 --out {tmp}/locked/g.json"))
    assert re.search("no permission|Permission denied", error_line(result, "locked/g.json"))


def test_a_write_that_fails_is_one_line(places, monkeypatch):
    """An OSError at write time (a full disk, a read-only file system) is one line too."""
    def full(*_args, **_kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(importlib.import_module("adag.store"), "atomic_write_bytes", full)
    error_line(RUNNER.invoke(app, places.words("export {run} --prompt 0 --out {tmp}/g.json")), "No space left")


# Class 2: a stage run on some clusters keeps the finished results of the others.

def test_describe_on_some_clusters_keeps_the_others_and_a_noop_keeps_the_entry(places):
    parts = {c: (places.run / f"describe/descriptions/part-{c:06d}.parquet").read_bytes() for c in (0, 1, 2)}
    before = finished(places.run)
    assert "described 3 clusters (0 failed)" in cli(places, "describe {run} --clusters 0 " + LLM).stdout
    assert finished(places.run) == before  # all there with these settings: nothing changes, timings included
    cli(places, "describe {run} " + LLM)
    assert finished(places.run) == before
    line = error_line(RUNNER.invoke(app, places.words("describe {run} --clusters 0 --seed 1 " + LLM)),
                      "holds finished 'describe' results for clusters [1, 2] made with other settings (--seed)")
    assert "describe every cluster with the new settings" in line and finished(places.run) == before
    assert {c: (places.run / f"describe/descriptions/part-{c:06d}.parquet").read_bytes() for c in (0, 1, 2)} == parts


def test_describe_cluster_by_cluster_adds_up_and_its_ledger_accumulates(places):
    shutil.rmtree(places.run / "describe")
    manifest = json.loads((places.run / MANIFEST).read_text())
    del manifest["stages"]["describe"]
    (places.run / MANIFEST).write_text(json.dumps(manifest))
    first = cli(places, "describe {run} --clusters 1 " + LLM)
    assert "described 1 clusters" in first.stdout
    ledger = RunDir.open(places.run).read_table("describe", "ledger")
    cli(places, "describe {run} --clusters 0,2 " + LLM)
    run = RunDir.open(places.run)
    assert sorted(run.read_table("describe", "descriptions")["cluster"]) == [0, 1, 2]
    assert run.stage_config("describe")["clusters"] is None  # all of them now
    both = run.read_table("describe", "ledger")
    assert len(both) > len(ledger) and sorted(both["invocation"].unique()) == [0, 1]
    assert both[both["invocation"] == 0].drop(columns="invocation").equals(ledger.drop(columns="invocation"))


def test_a_noop_trace_keeps_its_timings(places):
    before = finished(places.run)
    entry = RunDir.open(places.run).entry("trace")
    assert entry["phase_seconds"]
    cli(places, TRACE.replace("{new}", "{run}"))
    assert finished(places.run) == before and RunDir.open(places.run).entry("trace") == entry


STEER = "steer {run} --multipliers 0,2 --batch-size 8"


def test_steer_and_judge_on_some_clusters_keep_the_others(places, server):
    cli(places, STEER + " --clusters 0")
    cli(places, STEER + " --clusters 2")
    run = RunDir.open(places.run)
    summary = run.read_table("steer", "summary")
    assert sorted(summary["cluster"].unique()) == [0, 2] and run.stage_config("steer")["clusters"] == [0, 2]
    before = finished(places.run)
    cli(places, STEER + " --clusters 2")  # done already with these settings
    assert finished(places.run) == before
    error_line(RUNNER.invoke(app, places.words("steer {run} --multipliers 0,3 --clusters 2")),
               "clusters [0] made with other settings (--multipliers)")
    assert finished(places.run) == before
    judge = f"judge {{run}} --judge openai:fake@{server.url} --question Harmful? --samples 1 --max-new-tokens 2"
    cli(places, judge + " --cluster 0")
    cli(places, judge + " --cluster 1")
    rates = RunDir.open(places.run).read_table("judge", "rates")
    assert sorted(rates["cluster"].unique()) == [0, 1]
    error_line(RUNNER.invoke(app, places.words(judge + " --cluster 2 --samples 2")),
               "clusters [0, 1] made with other settings (--samples)")


# Class 4: correlate needs 3 finite values; metadata must be numbers (or all true/false).

@pytest.fixture(scope="module")
def metadata_run(model_dir, tmp_path_factory):
    """Four prompts whose metadata fields are each wrong in one way, traced and clustered."""
    rows = [{"prompt": f"What is the capital of {country}?", "metadata": {
        "mixed": [1, "2", 3, 4][i], "huge": [1, 2, 10**400, 4][i], "sparse": [1, 2, None, None][i],
        "flag": [True, False, True, 1][i], "same": 5, "good": [0.5, 1, 2, 7][i]}}
        for i, country in enumerate(["France", "Spain", "Italy", "Japan"])]
    data = tmp_path_factory.mktemp("metadata") / "rows.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    run = data.parent / "run"
    places = Places(model_dir, data, run, run, run, "", data.parent)
    cli(places, TRACE)
    cli(places, "cluster {run} --k 2")
    short = data.parent / "two"
    cli(Places(model_dir, data, short, run, run, "", data.parent), TRACE + " --limit 2")
    cli(Places(model_dir, data, short, run, short, "", data.parent), "cluster {run} --k 2")
    return run, short


@pytest.mark.parametrize("field, match", [
    ("mixed", "metadata field 'mixed' is \"2\", not a finite number on prompt 1"),
    ("huge", "is 1000000"), ("sparse", "metadata field 'sparse' is missing on prompt 2"),
    ("flag", "give every prompt a number (or every prompt true/false)"),
    ("same", "the value is the same on every prompt (5)"),
    ("good@two", "correlate needs at least 3 prompts with a finite value, and 2")])
def test_correlate_refuses_values_it_cannot_correlate(metadata_run, field, match):
    run = metadata_run[1] if field.endswith("@two") else metadata_run[0]
    before = finished(run)
    error_line(RUNNER.invoke(app, ["correlate", str(run), "--field", field.split("@")[0]]), match)
    assert finished(run) == before


def test_correlate_uses_the_finite_values(metadata_run):
    assert "clusters correlate significantly with good" in cli(
        Places(*[metadata_run[0]] * 5, "", metadata_run[0]), f"correlate {metadata_run[0]} --field good").stdout


# Class 6: text from models and LLMs reaches the terminal without control characters; labels are capped.

ESCAPES = "\x1b[31mred\x1b[0m \x1b]0;owned\x07\x07bell\x00nul"


def hostile(text: str) -> str:
    if "label of one to" in text:
        return "label" + "x" * 10_000 + ESCAPES
    return cooperative(text) if "JSON list of" in text else "tokens " + ESCAPES


def test_llm_text_is_printed_without_control_characters_and_labels_are_capped(places):
    with contextlib.ExitStack() as stack:
        llm_server(respond=hostile)(places, stack)
        described = cli(places, f"describe {{run}} --clusters 0,1,2 --seed 3 {LLM}")
    assert "red" in described.stdout and not re.search(r"[\x00-\x08\x0b-\x1f\x7f]", described.output)
    table = RunDir.open(places.run).read_table("describe", "descriptions")
    assert table["label"].str.len().max() <= 80 and not table["input_description"].str.contains("\x1b").any()
    manifest = json.loads((places.run / MANIFEST).read_text())
    manifest["dataset"]["name"] = ESCAPES
    (places.run / MANIFEST).write_text(json.dumps(manifest))
    shown = cli(places, "info {run}")
    assert "red" in shown.stdout and not re.search(r"[\x00-\x08\x0b-\x1f\x7f]", shown.output)


# Class 7: serve binds beyond this machine only when told to, and says so.

def test_serving_beyond_loopback_warns_in_one_line(finished_run, caplog):
    with caplog.at_level("WARNING", logger="adag"):
        server = make_server(str(finished_run), "0.0.0.0", 0)
    server.server_close()
    assert [r.getMessage() for r in caplog.records if "every machine" in r.getMessage()]
    with caplog.at_level("WARNING", logger="adag"):
        caplog.clear()
        make_server(str(finished_run), "127.0.0.1", 0).server_close()
    assert not caplog.records


# Issue 32: classes of fault, each as a generated set of cases. Every error case: exit 2, one line, no
# traceback, the run byte-identical.

DEEP = 100_000


def deep_list(depth: int) -> str:
    return "[" * depth + "]" * depth


def deep_object(depth: int) -> str:
    return '{"a": ' * depth + "1" + "}" * depth


def jsonl_row(metadata: str = "{}", **fields: str) -> bytes:
    extra = "".join(f', "{key}": {value}' for key, value in fields.items())
    return f'{{"prompt": "What is the capital of France?", "metadata": {metadata}{extra}}}\n'.encode()


NESTING = {
    "metadata list 100000 deep": dataset(".jsonl", jsonl_row(f'{{"x": {deep_list(DEEP)}}}')),
    "metadata object 100000 deep": dataset(".jsonl", jsonl_row(deep_object(DEEP))),
    "metadata 65 deep (one over the limit)": dataset(".jsonl", jsonl_row(f'{{"x": {deep_list(64)}}}')),
    "labels 100000 deep": dataset(".jsonl", jsonl_row(labels=deep_list(DEEP))),
    "a whole row 100000 deep": dataset(".jsonl", deep_list(DEEP).encode() + b"\n"),
    "csv labels 100000 deep": dataset(".csv", b"prompt,labels\nHi," + deep_list(DEEP).encode() + b"\n"),
}


@pytest.mark.parametrize("case", NESTING)
def test_deeply_nested_dataset_json_is_one_line(places, case):
    NESTING[case](places, None)
    before = finished(places.run)
    error_line(RUNNER.invoke(app, places.words(TRACE)), str(places.data))
    assert finished(places.run) == before and not places.new.exists()


@pytest.mark.parametrize("command", ["info {run}", "info {run} --verify", "cluster {run} --k 2", "report {run}",
                                     "export {run} --prompt 0 --out {tmp}/g.json", TRACE.replace("{new}", "{run}")])
@pytest.mark.parametrize("nested", [deep_list(DEEP), deep_object(DEEP), f'{{"stages": {deep_list(70)}}}'])
def test_a_deeply_nested_manifest_is_one_line(places, command, nested):
    manifest(nested.encode())(places, None)
    before = finished(places.run)
    error_line(RUNNER.invoke(app, places.words(command)), "manifest.json is not valid JSON")
    assert finished(places.run) == before




def unreadable_file(relative: str):
    """Take read permission from a file: {data} (the dataset), or one of the run's files."""
    def prepare(places: Places, stack: contextlib.ExitStack) -> None:
        path = places.data if relative == "data" else places.run / relative
        path.chmod(0)
        stack.callback(path.chmod, 0o644)
    return prepare


def unreadable_folder(places: Places, stack: contextlib.ExitStack) -> None:
    folder = places.tmp / "locked"
    folder.mkdir()
    shutil.copy(places.data, folder / "data.jsonl")
    places.data = folder / "data.jsonl"
    folder.chmod(0)
    stack.callback(folder.chmod, 0o755)


NO_READ = [  # (case, command, preparation, what the line says)
    ("dataset jsonl", TRACE, unreadable_file("data"), "cannot read"),
    ("dataset csv", TRACE, lambda p, s: (dataset(".csv", b"prompt\nHi\n")(p, s), unreadable_file("data")(p, s)),
     "cannot read"),
    ("dataset in a folder without permission", TRACE, unreadable_folder, "permission"),
    ("manifest (info)", "info {run}", unreadable_file(MANIFEST), "cannot read"),
    ("manifest (cluster)", "cluster {run} --k 2", unreadable_file(MANIFEST), "cannot read"),
    ("nodes part (cluster)", "cluster {run} --k 2", unreadable_file("trace/nodes/part-000000.parquet"),
     "cannot read"),
    ("nodes part (report)", "report {run}", unreadable_file("trace/nodes/part-000000.parquet"), "cannot read"),
    ("edges part (export)", "export {run} --prompt 0 --out {tmp}/g.json",
     unreadable_file("trace/edges/part-000000.parquet"), "cannot read"),
    ("half-neurons table (steer)", "steer {run} --multipliers 0", unreadable_file("cluster/half_neurons.parquet"),
     "cannot read"),
    ("descriptions part (report)", "report {run}", unreadable_file("describe/descriptions/part-000000.parquet"),
     "cannot read"),
    ("study file", "run {tmp}/study.toml", lambda p, s: (
        (p.tmp / "study.toml").write_text(f'model = "{p.model}"\ndataset = "{p.data}"\nout = "{p.new}"\n'),
        (p.tmp / "study.toml").chmod(0), s.callback((p.tmp / "study.toml").chmod, 0o644)), "Permission denied"),
]


@NEEDS_PERMISSIONS
@pytest.mark.parametrize("case, command, prepare, match", NO_READ, ids=[row[0] for row in NO_READ])
def test_an_unreadable_input_is_one_line(places, case, command, prepare, match):
    before = finished(places.run)
    with contextlib.ExitStack() as stack:
        prepare(places, stack)
        with permissions_enforced():
            result = RUNNER.invoke(app, places.words(command))
    error_line(result, match)
    assert finished(places.run) == before


@NEEDS_PERMISSIONS
@pytest.mark.parametrize("file", ["trace/nodes/part-000001.parquet", "cluster/clusters.parquet",
                                  "describe/ledger.parquet"])
def test_info_verify_names_an_unreadable_run_file(places, file):
    with contextlib.ExitStack() as stack:
        unreadable_file(file)(places, stack)
        with permissions_enforced():
            result = cli(places, "info {run} --verify", code=1)
    assert f"damaged  cannot read {places.run / file} (no permission)" in result.stdout and not result.stderr


NOT_TEXT = {  # a lone surrogate, written as a JSON escape, in every place a row holds text
    "prompt": jsonl_row().replace(b"France?", b"France?\\ud800"),
    "prompt, low surrogate": jsonl_row().replace(b"What", b"\\udfffWhat"),
    "seed_response": jsonl_row(seed_response='"Answer:\\ud83d"'),
    "label": jsonl_row(labels='[" Paris\\udc00"]'),
    "metadata value": jsonl_row('{"note": "x\\ud800"}'),
    "metadata key": jsonl_row('{"x\\ud800": 1}'),
    "nested metadata": jsonl_row('{"a": [{"b": "\\udbff"}]}'),
}


@pytest.mark.parametrize("case", NOT_TEXT)
def test_text_the_tokenizer_cannot_take_is_one_line(places, case):
    dataset(".jsonl", NOT_TEXT[case])(places, None)
    error_line(RUNNER.invoke(app, places.words(TRACE)), "lone surrogate")
    assert not places.new.exists()


def test_a_surrogate_pair_is_text(places):
    dataset(".jsonl", jsonl_row().replace(b"France?", b"France? \\ud83c\\udf0d"))(places, None)
    assert "traced 1 prompts" in cli(places, TRACE).stdout


INVISIBLE = ["\u200b", "\u200c\u200d", "\u2060", "\ufeff", "\u202e", "\u2066\u2069", "\u200e\u200f", "\u061c",
             "\u00ad", "\u3164", "\u2800", "\u034f", "\ufe0f", "\U000e0020", "\u0301", " \u200b\t\u202e \u3000",
             "\u180e", "\u2028", "\u115f\u1160"]


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
@pytest.mark.parametrize("text", INVISIBLE, ids=[ascii(t) for t in INVISIBLE])
def test_a_prompt_of_only_invisible_characters_is_refused_like_whitespace(places, text, suffix):
    row = json.dumps({"prompt": text}) + "\n" if suffix == ".jsonl" else f'prompt\n"{text}"\n'
    dataset(suffix, row.encode())(places, None)
    error_line(RUNNER.invoke(app, places.words(TRACE)), "prompt is empty")
    assert not places.new.exists()


def test_a_prompt_with_invisible_characters_and_text_is_kept(places):
    dataset(".jsonl", (json.dumps({"prompt": "\u200bWhat is the capital of \u202aFrance\u202c?"}) + "\n").encode())(
        places, None)
    assert "traced 1 prompts" in cli(places, TRACE).stdout


def swapped(file: str, other: str):
    """Replace `file` by the bytes of `other` (same table) and record the new size in the manifest, as a
    careless copy or a hand-edit would: only the hash is left to tell."""
    def prepare(places: Places, _stack) -> None:
        (places.run / file).write_bytes((places.run / other).read_bytes())
        manifest = json.loads((places.run / MANIFEST).read_text())
        stage, name = file.split("/", 1)
        manifest["stages"][stage]["files"][name]["size"] = (places.run / file).stat().st_size
        (places.run / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return prepare


# swap: (file, the file whose bytes it gets, the readers of that table)
SWAPS = {"nodes parts": ("trace/nodes/part-000000.parquet", "trace/nodes/part-000001.parquet",
                         ("cluster", "report", "describe", "export", "info --verify")),
         "edges parts": ("trace/edges/part-000001.parquet", "trace/edges/part-000002.parquet",
                         ("cluster", "report", "export", "info --verify")),
         "prompts parts": ("trace/prompts/part-000002.parquet", "trace/prompts/part-000000.parquet",
                           ("cluster", "report", "describe", "export", "steer", "info --verify")),
         "descriptions parts": ("describe/descriptions/part-000000.parquet",
                                "describe/descriptions/part-000002.parquet", ("report", "info --verify"))}
SWAP_READERS = {"cluster": "cluster {run} --k 2", "report": "report {run}", "describe": "describe {run} " + LLM,
                "export": "export {run} --prompt 0 --out {tmp}/g.json", "steer": "steer {run} --multipliers 0",
                "info --verify": "info {run} --verify"}


@pytest.mark.parametrize("case, reader", [(case, reader) for case, (*_, readers) in SWAPS.items()
                                          for reader in readers])
def test_a_swapped_part_with_its_size_fixed_is_named_by_every_reader(places, case, reader):
    file, other, _ = SWAPS[case]
    swapped(file, other)(places, None)
    before = finished(places.run)
    result = RUNNER.invoke(app, places.words(SWAP_READERS[reader]))
    if reader == "info --verify":
        assert result.exit_code == 1 and f"{places.run / file} is damaged (contents differ" in result.stdout
    else:
        error_line(result, f"{places.run / file} is damaged (contents differ from the recorded SHA-256)")
    assert finished(places.run) == before


def test_describe_repairs_a_swapped_descriptions_part(places):
    file, other, _ = SWAPS["descriptions parts"]
    clean = RunDir.open(places.run).read_table("describe", "descriptions")
    swapped(file, other)(places, None)
    assert "warning: 1 damaged file(s)" in cli(places, "describe {run} " + LLM).stderr
    assert RunDir.open(places.run).read_table("describe", "descriptions").equals(clean)


@pytest.mark.parametrize("key", ['"prompt"', '"metadata"', '"labels"'])
def test_a_jsonl_key_given_twice_is_refused_like_a_csv_column(places, key):
    values = {'"prompt"': '"Other?"', '"metadata"': "{}", '"labels"': "[]"}
    row = jsonl_row(labels="[]").decode().rstrip("}\n") + f", {key}: {values[key]}}}\n"
    dataset(".jsonl", row.encode())(places, None)
    error_line(RUNNER.invoke(app, places.words(TRACE)), f"key {key[1:-1]!r} appears twice in one object")


def test_a_metadata_key_given_twice_is_refused(places):
    dataset(".jsonl", jsonl_row('{"asr": 1, "asr": 2}'))(places, None)
    error_line(RUNNER.invoke(app, places.words(TRACE)), "key 'asr' appears twice")


def number_fields() -> list[tuple[str, str]]:
    """(stage, field) of every setting that takes a number and not true/false."""
    from adag.settings import _accepts

    return [(stage.name, name) for stage in STAGES.values() for model in (stage.config, stage.options) if model
            for name, spec in model.model_fields.items()
            if _accepts(spec.annotation, int, float) and not _accepts(spec.annotation, bool)]


@pytest.mark.parametrize("stage, name", number_fields())
@pytest.mark.parametrize("value", [True, False])
def test_true_or_false_is_refused_where_a_number_is_expected(stage, name, value):
    model = next(m for m in (STAGES[stage].config, STAGES[stage].options) if m and name in m.model_fields)
    annotation = model.model_fields[name].annotation
    given = [value] if "list" in str(annotation) else value
    with pytest.raises(ValueError, match="true/false, not a number"):
        model.model_validate({name: given})


@pytest.mark.parametrize("section, line", [("cluster", "seed = true"), ("cluster", "k = false"),
                                           ("steer", "multipliers = [0, true]"), ("trace", "batch_size = true")])
def test_a_study_file_with_true_for_a_number_is_one_line(places, section, line):
    study = places.tmp / "study.toml"
    study.write_text(f'model = "{places.model}"\ndataset = "{places.data}"\nout = "{places.run}"\n'
                     f"[{section}]\n{line}\n")
    before = finished(places.run)
    error_line(RUNNER.invoke(app, ["run", str(study)]), "true/false, not a number")
    assert finished(places.run) == before


NOOP_RERUNS = ["cluster {run} --k 3", "faithfulness {run} --fractions 0.5", "steer {run} --multipliers 0,2",
               "correlate {run} --field score", "describe {run} " + LLM, "report {run}",
               TRACE.replace("{new}", "{run}")]


def test_a_noop_rerun_of_every_stage_leaves_the_run_byte_identical(places):
    """Each stage run once more with the settings it was made with: nothing changes, timings included."""
    for command in NOOP_RERUNS:
        cli(places, command)
    before = finished(places.run)
    for command in NOOP_RERUNS:
        cli(places, command)
        assert finished(places.run) == before, command


BIDI = "\u202eexe.jpg\u202c \u2066hidden\u2069 \u200fmark \u061c"


def bidi_llm(text: str) -> str:
    if "label of one to" in text:
        return "label " + BIDI
    return cooperative(text) if "JSON list of" in text else "the tokens " + BIDI + "\x1b[2J"


def test_bidi_controls_in_llm_text_never_reach_the_terminal(places):
    with contextlib.ExitStack() as stack:
        llm_server(respond=bidi_llm)(places, stack)
        described = cli(places, f"describe {{run}} --seed 5 {LLM}")
    controls = re.compile("[\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069\x1b]")
    assert "exe.jpg" in described.stdout and not controls.search(described.output)
    table = RunDir.open(places.run).read_table("describe", "descriptions")
    for column in ("label", "input_description", "output_description"):
        assert not table[column].str.contains(controls).any(), column


def test_fix_hints_name_the_run_where_it_is_now(places):
    """A run copied elsewhere: a damaged part's hint names the copy, and following it repairs the copy."""
    moved = places.tmp / "moved here"
    shutil.move(places.run, moved)
    places.run = moved
    truncate(moved / "trace/nodes/part-000000.parquet")
    line = error_line(RUNNER.invoke(app, places.words("cluster {run} --k 2")), "is damaged")
    command = re.search(r"rewrite it with `adag (.*)`$", line).group(1)
    assert "moved here" in command and str(places.new.parent / "run") not in command
    assert "traced" in RUNNER.invoke(app, shlex.split(command)).stdout
    assert RunDir.open(moved).verify(hashes=True) == []
    cli(places, "cluster {run} --k 2")  # describe is stale now: the report's hint names the moved run too
    assert f"rerun `adag describe '{moved}'" in cli(places, "report {run}").stderr


def test_report_on_a_stale_describe_says_so(places):
    cli(places, "cluster {run} --k 2")  # describe is stale now
    result = cli(places, "report {run}")
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and "'describe' results are stale" in warnings[0]
    assert f"rerun `adag describe {places.run}" in warnings[0]


def test_csv_numbers_are_numbers_for_correlate(places):
    rows = "".join(f"What is the capital of {c}?,{i * 1.5},{i}\n" for i, c in
                   enumerate(["France", "Spain", "Italy", "Japan", "Peru", "Chad"]))
    dataset(".csv", f"prompt,score,rank\n{rows}".encode())(places, None)
    cli(places, TRACE)
    new = Places(places.model, places.data, places.new, places.file, places.new, places.llm, places.tmp)
    cli(new, "cluster {run} --k 2")
    assert "correlate significantly with score" in cli(new, "correlate {run} --field score").stdout
    assert "correlate significantly with rank" in cli(new, "correlate {run} --field rank").stdout


def _hang_up(port: int, request: bytes) -> None:
    """Send `request` and hang up at once with a reset (as a browser cancelling a fetch does)."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        sock.sendall(request)


def _post(port: int, body: bytes, length: int | None = None) -> bytes:
    return (f"POST /api/steer HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body) if length is None else length}\r\n\r\n").encode() + body


@pytest.mark.slow  # a server process and 200 connections (about a minute)
def test_the_server_survives_hang_ups_and_deep_bodies_without_a_traceback(finished_run):
    """200 clients that hang up before their reply (GETs, steers, bodies cut short), then a body of 60,000
    '[' (under the size limit): no line on the server's terminal, a 400 for the deep body, still serving."""
    env = os.environ | {"PYTHONPATH": str(Path(__file__).parents[1])}
    with subprocess.Popen([sys.executable, "-c", "from adag.cli import app; app()", "serve", str(finished_run),
                           "--port", "0"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True) as server:
        try:
            port = int(re.search(r":(\d+)/", server.stdout.readline()).group(1))
            steer = json.dumps({"prompt": 0, "cluster": 0, "multiplier": 0}).encode()
            requests = [f"GET /api/data HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode(),
                        f"GET /api/prompt/1 HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode(),
                        _post(port, steer), _post(port, steer[:5], length=len(steer)), b"GET / HT"]
            for index in range(200):
                _hang_up(port, requests[index % len(requests)])
            deep = _post(port, b"[" * 60_000)
            with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
                sock.sendall(deep)
                assert sock.recv(64).startswith(b"HTTP/1.0 400")
            for path in ("/api/data", "/api/prompt/0"):
                connection = __import__("http.client").client.HTTPConnection("127.0.0.1", port, timeout=60)
                connection.request("GET", path)
                assert connection.getresponse().status == 200
        finally:
            server.send_signal(signal.SIGINT)
            _, stderr = server.communicate(timeout=60)
    assert "Traceback" not in stderr and "Error" not in stderr and "terminate" not in stderr, stderr
    assert server.returncode == 0  # stopped as a server is stopped: no model left running in a thread


# Interruptions and concurrent commands: SIGINT, SIGTERM or SIGKILL in the middle of a stage, then the same
# command again, gives the tables of an uninterrupted run and leaves no lock and no staging behind.

ADAG_PROCESS = [sys.executable, "-c", "from adag.cli import app; app()"]
TABLES = {"trace": ("prompts", "nodes", "edges", "embeddings"), "describe": ("descriptions",)}


def _interrupted(words: list[str], started: Callable[[], bool], sig: int, env: dict) -> int:
    """Run the CLI in a process and send `sig` once `started()` holds; its exit status."""
    with subprocess.Popen([*ADAG_PROCESS, *words], env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True) as process:
        while process.poll() is None and not started():
            time.sleep(0.01)
        process.send_signal(sig)
        _, stderr = process.communicate(timeout=120)
    assert "Traceback" not in stderr, stderr
    return process.returncode


@pytest.fixture(scope="module")
def clean_trace(model_dir, tmp_path_factory):
    """Eight prompts traced one per batch without interruption: the tables an interrupted trace must give."""
    folder = tmp_path_factory.mktemp("clean-trace")
    data = folder / "rows.jsonl"
    data.write_text("".join(json.dumps(row.model_dump()) + "\n" for row in load_dataset("country-capitals", 8).rows))
    places = Places(model_dir, data, folder / "run", folder, folder / "run", "", folder)
    cli(places, INTERRUPTED_TRACE)
    return places


INTERRUPTED_TRACE = TRACE.replace("--batch-size 2", "--batch-size 1")


@pytest.mark.slow  # a process that loads torch
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=lambda s: signal.Signals(s).name)
def test_a_trace_interrupted_then_rerun_gives_the_uninterrupted_tables(clean_trace, tmp_path, sig):
    places = dataclasses.replace(clean_trace, new=tmp_path / "interrupted")
    env = os.environ | {"PYTHONPATH": str(Path(__file__).parents[1])}
    parts = places.new / STAGING / "trace" / "nodes"
    code = _interrupted(places.words(INTERRUPTED_TRACE), lambda: any(parts.glob("part-*.parquet")), sig, env)
    assert code == {signal.SIGINT: 130, signal.SIGTERM: 143, signal.SIGKILL: -signal.SIGKILL}[sig]
    if sig != signal.SIGKILL:
        assert not (places.new / ".lock").exists()  # released on the way out
    assert "trace" not in RunDir.open(places.new).manifest["stages"]
    cli(places, INTERRUPTED_TRACE)
    clean, again = RunDir.open(clean_trace.run), RunDir.open(places.new)
    for name in TABLES["trace"]:
        assert again.read_table("trace", name).equals(clean.read_table("trace", name)), name
    assert not (places.new / ".lock").exists() and not (places.new / STAGING).exists()


@pytest.mark.slow  # a process that loads torch, and a slow LLM server
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=lambda s: signal.Signals(s).name)
def test_describe_interrupted_then_rerun_keeps_every_call_in_its_ledger(places, sig):
    """Interrupted once a cluster is written: the rerun describes the rest, and the ledger counts the calls of
    both invocations (those made before the interruption were paid for)."""
    clean = RunDir.open(places.run).read_table("describe", "descriptions")
    shutil.rmtree(places.run / "describe")
    manifest = json.loads((places.run / MANIFEST).read_text())
    del manifest["stages"]["describe"]
    (places.run / MANIFEST).write_text(json.dumps(manifest))
    with FakeOpenAI() as fake:
        handler = fake.server.RequestHandlerClass
        answer = handler.do_POST
        handler.do_POST = lambda request: (time.sleep(0.1), answer(request))
        places.llm = fake.url
        parts = places.run / STAGING / "describe" / "descriptions"
        env = os.environ | {"ADAG_CACHE": str(places.tmp / "cache"), "PYTHONPATH": str(Path(__file__).parents[1])}
        _interrupted(places.words(f"describe {{run}} {LLM}"), lambda: any(parts.glob("part-*.parquet")), sig, env)
        assert not (places.run / ".lock").exists()
        sent = len(fake.requests)
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("ADAG_CACHE", str(places.tmp / "cache"))
            cli(places, f"describe {{run}} {LLM}")
    run = RunDir.open(places.run)
    ledger = run.read_table("describe", "ledger")
    assert sorted(ledger["invocation"].unique()) == [0, 1]
    assert (~ledger[ledger["invocation"] == 0]["cached"]).sum() >= 1  # the first invocation's paid calls
    assert int((~ledger["cached"]).sum()) >= sent - 1  # every request the server saw (one may be in flight)
    assert sorted(run.read_table("describe", "descriptions")["cluster"]) == sorted(clean["cluster"])
    assert not (places.run / STAGING).exists() and not (places.run / ".lock").exists()


HOLD_LOCK = ("import sys, time\nfrom adag.store import RunDir\nwith RunDir.open(sys.argv[1]).lock():\n"
             "    print('held', flush=True)\n    time.sleep(120)\n")
WRITERS = ["cluster {run} --k 2", "describe {run} " + LLM, "steer {run} --multipliers 0", "report {run}",
           "faithfulness {run}", "correlate {run} --field score", TRACE.replace("{new}", "{run}")]


def test_a_second_command_on_a_run_being_written_is_one_line_and_changes_nothing(places):
    """Every writing command, while another process writes the run: refused in one line naming the holder."""
    with subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(places.run)], stdout=subprocess.PIPE,
                          text=True, env=os.environ | {"PYTHONPATH": str(Path(__file__).parents[1])}) as holder:
        try:
            assert holder.stdout.readline().strip() == "held"
            before = finished(places.run)
            for command in WRITERS:
                line = error_line(RUNNER.invoke(app, places.words(command)), "being written by another adag process")
                assert f"pid {holder.pid}" in line, command
            assert finished(places.run) == before
        finally:
            holder.kill()


STAGE_COMMANDS = {"cluster": "cluster {run} --k 2", "describe": "describe {run} --seed 4 " + LLM,
                  "steer": "steer {run} --multipliers 0,3", "faithfulness": "faithfulness {run} --fractions 0.25",
                  "correlate": "correlate {run} --field score", "report": "report {run} --prompts 2"}


@pytest.mark.slow  # each stage three times
@pytest.mark.parametrize("stage", STAGE_COMMANDS)
def test_every_stage_interrupted_midway_then_rerun_gives_the_uninterrupted_tables(places, finished_run, stage,
                                                                                   monkeypatch):
    """Ctrl-C at a stage's second file write through the store (in the middle of its work, or as it commits):
    one line, exit 130, the finished results as they were, no lock; the same command again gives the tables
    of an uninterrupted run."""
    from adag.store import run as run_module
    from adag.store import writer

    clean = places.tmp / "clean"
    shutil.copytree(finished_run, clean)
    cli(dataclasses.replace(places, run=clean), STAGE_COMMANDS[stage])
    before = finished(places.run)
    writes = []
    real = writer.atomic_write_bytes

    def interrupted(path, data, exclusive=False):
        writes.append(path)
        if len(writes) == 2:
            raise KeyboardInterrupt
        return real(path, data, exclusive)

    with monkeypatch.context() as patch:
        patch.setattr(writer, "atomic_write_bytes", interrupted)
        patch.setattr(run_module, "atomic_write_bytes", interrupted)
        result = RUNNER.invoke(app, places.words(STAGE_COMMANDS[stage]))
    assert result.exit_code == 130 and "interrupted; rerun the same command" in result.stderr, result.output
    assert finished(places.run) == before and not (places.run / ".lock").exists()
    cli(places, STAGE_COMMANDS[stage])
    again, reference = RunDir.open(places.run), RunDir.open(clean)
    for file in reference.entry(stage)["files"]:
        if file.endswith(".parquet") and "ledger" not in file:
            name = file.removesuffix(".parquet").split("/part-")[0]
            assert again.read_table(stage, name).equals(reference.read_table(stage, name)), file
    assert not (places.run / STAGING).exists() and not (places.run / ".lock").exists()


def broken_cache(places: Places, stack: contextlib.ExitStack) -> None:
    cache = places.tmp / "cache"
    cache.mkdir()
    (cache / "llm-cache.sqlite").write_bytes(b"not a database " * 100)
    stack.enter_context(pytest.MonkeyPatch.context()).setenv("ADAG_CACHE", str(cache))


def test_an_llm_cache_that_is_not_a_database_is_one_line(places):
    before = finished(places.run)
    with contextlib.ExitStack() as stack:
        broken_cache(places, stack)
        result = RUNNER.invoke(app, places.words("describe {run} --seed 9 " + LLM))
    error_line(result, "the LLM cache cannot be used (file is not a database)")
    assert finished(places.run) == before


def test_ctrl_c_is_one_line_and_changes_nothing(places, monkeypatch):
    """typer turns KeyboardInterrupt into a silent exit status 130: the CLI says what happened."""
    def interrupt(*_args, **_kwargs):
        raise KeyboardInterrupt

    before = finished(places.run)
    monkeypatch.setattr(importlib.import_module("adag.store.writer").StageWriter, "write_table", interrupt)
    result = RUNNER.invoke(app, places.words("cluster {run} --k 2"))
    assert result.exit_code == 130 and result.stderr.strip() == "error: interrupted; rerun the same command to " \
        "resume where it stopped", result.output
    assert finished(places.run) == before and not (places.run / ".lock").exists()
