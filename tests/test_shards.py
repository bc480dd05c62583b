"""One trace in several processes (`adag trace --shard I/N`, torchrun ranks) gives the tables of one
process, also when a shard is killed and rerun. Every process runs with one thread, so that the
same batch is computed in the same order everywhere and the tables agree bit for bit."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from adag.datasets import load_dataset
from adag.store import RunDir
from tests.test_cli import adag, one_line_error
from tests.test_trace import _assert_same_tables, _tables

pytestmark = pytest.mark.slow  # each builds a run through processes or the CLI

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
ADAG = [sys.executable, "-m", "adag"]
TORCHRUN = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc-per-node", "2", "-m", "adag"]


def run(command, code=0):
    done = subprocess.run([str(word) for word in command], env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == code, done.stderr
    return done


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "prompts.jsonl"
    path.write_text("\n".join(row.model_dump_json() for row in load_dataset("country-capitals", limit=8).rows))
    return path


@pytest.fixture(scope="module")
def trace(model_dir, prompts_file):
    def arguments(out, *extra):
        return ["trace", "--model", model_dir, "--dataset", prompts_file, "--out", out, "--threshold", "0.03",
                "--batch-size", "1", *extra]
    return arguments


def one_process(trace, out, *extra):
    """The same trace in this process, with one thread like the others."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        adag(*trace(out, *extra))
    finally:
        torch.set_num_threads(threads)
    return _tables(RunDir.open(out))


def test_two_shards_one_killed_and_rerun_give_the_tables_of_one_process(trace, tmp_path):
    out = tmp_path / "sharded"
    killed = subprocess.Popen([*ADAG, *map(str, trace(out, "--shard", "0/2"))], env=ENV, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    records = out / ".staging" / "trace" / ".parts-0-of-2.jsonl"
    while killed.poll() is None and not (records.is_file() and "prompts/" in records.read_text()):
        time.sleep(0.01)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    shard_0_parts = [json.loads(line)["file"] for line in records.read_text().splitlines()]
    assert 0 < sum(file.startswith("prompts/") for file in shard_0_parts) < 4  # killed half way

    waiting = run([*ADAG, *trace(out, "--shard", "1/2")])
    assert "of 8 batches done" in waiting.stdout and not RunDir.open(out).stage_done("trace")
    one_line_error("trace", "--finish", out, match="are not traced yet")
    last = run([*ADAG, *trace(out, "--shard", "0/2")])
    assert "traced 8 prompts" in last.stdout

    sharded = RunDir.open(out)
    assert sharded.entry("trace")["shards"] == 2 and sharded.verify(hashes=True) == []
    assert not (out / ".staging").exists() and not list((out / "trace").glob(".*"))
    _assert_same_tables(one_process(trace, tmp_path / "one"), _tables(sharded), tol=0)


def test_torchrun_ranks_pool_the_dataset_together_and_rank_0_commits(trace, tmp_path):
    dataset_wide = ("--aggregate-over", "dataset")
    ranks = run([*TORCHRUN, *trace(tmp_path / "ranks", *dataset_wide)])
    assert ranks.stdout.count("traced 8 prompts") == 2
    together = RunDir.open(tmp_path / "ranks")
    alone = one_process(trace, tmp_path / "one", *dataset_wide)
    _assert_same_tables(alone, _tables(together), tol=0)
    assert together.read_table("trace", "dataset_keys").equals(
        RunDir.open(tmp_path / "one").read_table("trace", "dataset_keys"))


def test_shard_and_finish_options_are_checked_before_any_work(trace, model_dir, tmp_path):
    out = tmp_path / "run"
    one_line_error(*trace(out, "--shard", "2/2"), match="--shard 2/2: write I/N with 0 <= I < N")
    one_line_error("trace", "--finish", out, "--model", model_dir, match="--finish RUN takes no --model")
    one_line_error("trace", "--threshold", "0.1", match="needs --model, --dataset and --out (or --finish RUN")
    assert not out.exists()
    one_line_error("trace", "--finish", tmp_path, match="not an adag run directory")
