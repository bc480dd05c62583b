import hashlib
import json
import logging
import subprocess
import sys

import pandas as pd
import pytest

from adag.errors import AdagError
from adag.store import FORMAT_VERSION, MANIFEST, DamagedFile, RunDir, RunLocked, Shard, StageWriter
from adag.view import RunView

MODEL = {"spec": "m", "weights": "w"}
DATASET = {"name": "d", "sha256": "s", "rows": 1}


def snapshot(path):
    """Every file under `path` with its SHA-256 (the lock file aside: it only exists while held)."""
    return {str(f.relative_to(path)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(path.rglob("*")) if f.is_file() and f.name != ".lock"}


def _commit(run, stage, config, tables, inputs=None):
    with StageWriter(run, stage, config, inputs=inputs) as out:
        for name, table in tables.items():
            out.write_table(name, table)
        out.facts["rows"] = sum(len(t) for t in tables.values())


def test_commit_records_files_and_reads_back(tmp_path):
    run = RunDir.create(tmp_path / "run", MODEL, DATASET)
    with StageWriter(run, "trace", {"k": 5}, resumable=True) as out:
        out.write_part("nodes", 0, pd.DataFrame({"a": [1, 2]}))
        out.write_part("nodes", 1, pd.DataFrame({"a": [3]}))
        out.facts["nodes"] = 3
    reopened = RunDir.open(tmp_path / "run")
    assert reopened.read_table("trace", "nodes")["a"].tolist() == [1, 2, 3]
    entry = reopened.entry("trace")
    assert reopened.stage_done("trace") and entry["nodes"] == 3 and entry["config"] == {"k": 5}
    record = entry["files"]["nodes/part-000000.parquet"]
    part = tmp_path / "run" / "trace" / "nodes" / "part-000000.parquet"
    assert record == {"size": part.stat().st_size, "sha256": hashlib.sha256(part.read_bytes()).hexdigest()}
    assert reopened.manifest["format_version"] == FORMAT_VERSION
    left = [p.name for p in (tmp_path / "run").rglob("*")]
    assert not [n for n in left if n.endswith((".tmp", ".pkl")) or n in (".staging", ".lock", ".parts.jsonl")]


def test_a_failed_stage_leaves_results_and_manifest_as_they_were(tmp_path):
    run = RunDir.create(tmp_path, MODEL, DATASET)
    _commit(run, "trace", {}, {"nodes": pd.DataFrame({"a": [1]})})
    _commit(run, "cluster", {"k": 3}, {"clusters": pd.DataFrame({"c": [0, 1, 2]})}, {"trace": run.entry("trace")["id"]})
    before = snapshot(tmp_path)
    with pytest.raises(RuntimeError), StageWriter(run, "cluster", {"k": 6}) as out:
        out.write_table("clusters", pd.DataFrame({"c": range(6)}))
        raise RuntimeError("interrupted")
    assert snapshot(tmp_path) == before
    assert RunDir.open(tmp_path).read_table("cluster", "clusters")["c"].tolist() == [0, 1, 2]


def test_resumable_stage_keeps_finished_parts_for_the_same_settings_only(tmp_path):
    run = RunDir.create(tmp_path, MODEL, DATASET)
    with pytest.raises(RuntimeError), StageWriter(run, "trace", {"k": 5}, resumable=True) as out:
        out.write_part("nodes", 0, pd.DataFrame({"a": [1]}))
        raise RuntimeError("interrupted")
    assert "trace" not in RunDir.open(tmp_path).manifest["stages"]
    assert run.staged_attempt("trace")["config"] == {"k": 5}
    with StageWriter(run, "trace", {"k": 5}, resumable=True) as out:
        assert out.has_part("nodes", 0) and not out.has_part("nodes", 1)
        out.write_part("nodes", 1, pd.DataFrame({"a": [2]}))
    assert run.read_table("trace", "nodes")["a"].tolist() == [1, 2]
    with pytest.raises(RuntimeError), StageWriter(run, "describe", {"x": 1}, resumable=True) as out:
        out.write_part("d", 0, pd.DataFrame({"a": [1]}))
        raise RuntimeError("interrupted")
    with StageWriter(run, "describe", {"x": 2}, resumable=True) as out:
        assert not out.has_part("d", 0)  # other settings start over
        out.cancel()


def test_a_damaged_part_is_redone_in_place_and_said_once(tmp_path, caplog):
    run = RunDir.create(tmp_path, MODEL, DATASET)
    with StageWriter(run, "trace", {"k": 5}, resumable=True) as out:
        for part in range(3):
            out.write_part("nodes", part, pd.DataFrame({"a": [part] * 50}))
        out.write_table("ledger", pd.DataFrame({"calls": [1]}))
    part = tmp_path / "trace" / "nodes" / "part-000001.parquet"
    part.write_bytes(part.read_bytes()[: part.stat().st_size // 2])
    with pytest.raises(DamagedFile, match=r"part-000001.parquet is damaged .* rewrite it with `adag trace"):
        run.read_table("trace", "nodes")
    assert len(run.verify()) == 1
    with caplog.at_level(logging.WARNING, logger="adag"), StageWriter(run, "trace", {"k": 5}, resumable=True) as out:
        assert out.has_part("nodes", 0) and not out.has_part("nodes", 1) and out.has_part("nodes", 2)
        out.write_part("nodes", 1, pd.DataFrame({"a": [1] * 50}))
        out.write_table("ledger", pd.DataFrame({"calls": range(20)}))  # a whole table rewritten by the repair
    assert len([r for r in caplog.records if "damaged" in r.message]) == 1
    assert run.read_table("trace", "nodes")["a"].tolist() == [0] * 50 + [1] * 50 + [2] * 50
    assert run.verify(hashes=True) == []


def test_same_content_keeps_dependents_current_other_content_makes_them_stale(tmp_path):
    run = RunDir.create(tmp_path, MODEL, DATASET)
    _commit(run, "cluster", {"k": 3}, {"clusters": pd.DataFrame({"c": [0, 1, 2]})})
    _commit(run, "describe", {}, {"d": pd.DataFrame({"c": [0]})}, {"cluster": run.entry("cluster")["id"]})
    _commit(run, "cluster", {"k": 3}, {"clusters": pd.DataFrame({"c": [0, 1, 2]})})
    assert run.stage_state("describe") == "done"
    _commit(run, "cluster", {"k": 2}, {"clusters": pd.DataFrame({"c": [0, 1]})})
    assert run.stage_state("describe") == "stale"
    assert (tmp_path / "describe" / "d.parquet").exists()  # kept until describe is rerun
    with pytest.raises(AdagError, match="'describe' results .* are stale"):
        run.require_stage("describe", "adag describe")
    with StageWriter(run, "describe", {}, inputs={"cluster": run.entry("cluster")["id"]}, resumable=True) as out:
        assert not out.repairing and not out.has_part("d", 0)  # stale parts are never resumed
        out.write_part("d", 0, pd.DataFrame({"c": [1]}))
    assert run.stage_state("describe") == "done" and not (tmp_path / "describe" / "d.parquet").exists()


def test_an_interrupted_commit_is_finished_by_the_next_open(tmp_path):
    run = RunDir.create(tmp_path, MODEL, DATASET)
    _commit(run, "cluster", {"k": 3}, {"clusters": pd.DataFrame({"c": [0, 1, 2]})})
    out = StageWriter(run, "cluster", {"k": 2}).__enter__()
    out.write_table("clusters", pd.DataFrame({"c": [0, 1]}))
    run.manifest["pending"] = {"stage": "cluster", "entry": {**run.entry("cluster"), "config": {"k": 2}}}
    run._save_manifest()  # the process dies here, between recording the commit and the renames
    out._lock.close()
    reopened = RunDir.open(tmp_path)
    assert "pending" not in reopened.manifest and reopened.stage_config("cluster") == {"k": 2}
    assert (tmp_path / "cluster" / "clusters.parquet").exists() and not (tmp_path / ".staging").exists()


HOLD = """
import sys, time
from adag.store import RunDir
with RunDir.open(sys.argv[1]).lock():
    print("held", flush=True)
    time.sleep(60)
"""


def test_a_second_writer_is_refused_and_a_dead_holder_is_taken_over(tmp_path):
    run = RunDir.create(tmp_path, MODEL, DATASET)
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(AdagError, match=rf"being written by another adag process \(pid {holder.pid}, started "):
            StageWriter(run, "cluster", {}).__enter__()
    finally:
        holder.kill()
        holder.wait()
    assert (tmp_path / ".lock").exists()  # left behind by the killed holder
    _commit(run, "cluster", {}, {"clusters": pd.DataFrame({"c": [0]})})
    assert run.stage_done("cluster") and not (tmp_path / ".lock").exists()


HOLD_SHARED = HOLD.replace(".lock()", ".lock(shared=True)")


def test_shard_writers_share_the_lock_and_every_other_writer_is_refused(tmp_path):
    run = RunDir.create(tmp_path, MODEL, DATASET)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_SHARED, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with run.lock(shared=True):  # another shard writer of the same run
            assert (tmp_path / ".lock").exists()
        assert (tmp_path / ".lock").exists()  # the other shard still holds it
        with pytest.raises(RunLocked, match=r"being written by another adag process \(the shard writers"):
            _commit(run, "cluster", {}, {"clusters": pd.DataFrame({"c": [0]})})
    finally:
        holder.kill()
        holder.wait()
    with run.lock(), pytest.raises(RunLocked, match="in another mode"), run.lock(shared=True):
        pass
    assert not (tmp_path / ".lock").exists()


def test_shards_write_their_own_parts_and_a_plain_writer_commits_them_all(tmp_path):
    run = RunDir.create(tmp_path, MODEL, DATASET)
    for index in (1, 0):
        with StageWriter(run, "describe", {"x": 1}, resumable=True, shard=Shard(index, 2)) as out:
            for part in range(index, 5, 2):
                out.write_part("d", part, pd.DataFrame({"part": [part]}))
            with pytest.raises(ValueError, match="cannot write part"):
                out.write_part("d", 1 - index, pd.DataFrame({"part": [0]}))
            out.facts["written"] = len(range(index, 5, 2))
        assert not run.stage_done("describe")
    assert sorted(run.staged_parts("describe")) == [f"d/part-{n:06d}.parquet" for n in range(5)]
    with pytest.raises(AdagError, match="unfinished 'describe' with other settings"), \
            StageWriter(run, "describe", {"x": 2}, resumable=True, shard=Shard(0, 2)):
        pass
    with StageWriter(run, "describe", {"x": 1}, resumable=True) as out:
        assert all(out.has_part("d", part) for part in range(5))
        assert [facts["written"] for facts in out.shard_facts()] == [3, 2]
    assert list(run.read_table("describe", "d")["part"]) == list(range(5))
    assert not list((tmp_path / "describe").glob(".*")) and not (tmp_path / ".staging").exists()
    with StageWriter(run, "describe", {"x": 1}, resumable=True, shard=Shard(1, 2)) as out:  # finished: nothing to do
        assert out.has_part("d", 3) and not out.has_part("d", 2)


def test_concurrent_creators_of_one_run_agree(tmp_path):
    (tmp_path / ".manifest.json.abc.tmp").write_bytes(b"{")  # another process's manifest half written
    first = RunDir.create(tmp_path, MODEL, DATASET)
    assert RunDir.create(tmp_path, MODEL, DATASET).manifest == first.manifest


@pytest.mark.parametrize("content, message", [
    (b"[1, 2]", "holds a JSON list, not an object"),
    (json.dumps({"format_version": FORMAT_VERSION}).encode(), "lacks 'adag_version'"),
    (bytes(range(256)), "is not valid JSON"),
    (b"{", "is not valid JSON"),
    (json.dumps({"format_version": 999}).encode(), "run format 999"),
    (json.dumps({"format_version": "3"}).encode(), 'format_version is "3", not a number'),
    (b"[" * 100_000, r"is not valid JSON \(nested more than 64 levels deep\)"),
])
def test_a_damaged_manifest_is_one_clear_error(tmp_path, content, message):
    RunDir.create(tmp_path, MODEL, DATASET)
    (tmp_path / "manifest.json").write_bytes(content)
    with pytest.raises(AdagError, match=message):
        RunDir.open(tmp_path)


def test_not_a_run_directory(tmp_path):
    with pytest.raises(AdagError, match="is not an adag run directory"):
        RunDir.open(tmp_path)
    (tmp_path / "file").write_text("x")
    with pytest.raises(AdagError, match="is not empty and is not an adag run"):
        RunDir.create(tmp_path, MODEL, DATASET)
    with pytest.raises(AdagError, match="is a file, not a directory"):
        RunDir.create(tmp_path / "file", MODEL, DATASET)


def test_reopening_with_another_model_is_refused(tmp_path):
    RunDir.create(tmp_path, MODEL, DATASET)
    with pytest.raises(AdagError, match="different model"):
        RunDir.create(tmp_path, {"spec": "other", "weights": "w"}, DATASET)


def test_missing_stage_and_table(tmp_path):
    run = RunDir.create(tmp_path, MODEL, DATASET)
    with pytest.raises(AdagError, match="no finished 'trace' stage; run `adag trace"):
        run.require_stage("trace", "adag trace")
    with pytest.raises(AdagError, match="no table 'trace/nodes'"):
        run.read_table("trace", "nodes")


def test_lock_is_reentrant_within_a_process(tmp_path):
    run = RunDir.create(tmp_path, MODEL, DATASET)
    with run.lock(), run.lock():
        assert run.holds_lock()
    assert not run.holds_lock() and not (tmp_path / ".lock").exists()


def test_a_stage_file_is_read_through_the_manifest(tmp_path):
    run = RunDir.create(tmp_path / "run", MODEL, DATASET)
    with StageWriter(run, "steer", {}) as out:
        out.file("plots/cluster-000.png").write_bytes(b"png")
    (tmp_path / "run" / "steer" / "plots" / "stray.png").write_bytes(b"not recorded")
    view = RunView(RunDir.open(tmp_path / "run"))
    assert view.file("steer", "plots/cluster-000.png") == b"png"
    assert view.file("steer", "plots/stray.png") is None and view.file("report", "report.html") is None
    (tmp_path / "run" / "steer" / "plots" / "cluster-000.png").write_bytes(b"pn")
    with pytest.raises(DamagedFile, match="cluster-000.png is damaged"):
        view.file("steer", "plots/cluster-000.png")


# Issue 32: every read is checked against size and SHA-256; entries are checked for shape; no-op commits.

def test_a_part_swapped_for_another_of_the_same_size_is_named(tmp_path):
    run = RunDir.create(tmp_path, MODEL, DATASET)
    with StageWriter(run, "trace", {}, resumable=True) as out:
        out.write_part("nodes", 0, pd.DataFrame({"a": [1]}))
        out.write_part("nodes", 1, pd.DataFrame({"a": [2]}))
    first, second = tmp_path / "trace/nodes/part-000000.parquet", tmp_path / "trace/nodes/part-000001.parquet"
    assert first.stat().st_size == second.stat().st_size
    first.write_bytes(second.read_bytes())
    with pytest.raises(DamagedFile, match=r"part-000000.parquet is damaged \(contents differ from the recorded"):
        RunDir.open(tmp_path).read_table("trace", "nodes")


@pytest.mark.parametrize("spoil", [
    lambda files: files["clusters.parquet"].pop("size"), lambda files: files["clusters.parquet"].update(size=True),
    lambda files: files["clusters.parquet"].update(sha256=None), lambda files: files.update({"../../x": files.pop(
        "clusters.parquet")}), lambda files: files.update({"/etc/passwd": {"size": 1, "sha256": "x"}})],
    ids=["no size", "size a boolean", "no hash", "a file outside the stage", "an absolute file"])
def test_a_manifest_entry_without_sizes_and_hashes_is_damaged(tmp_path, spoil):
    run = RunDir.create(tmp_path, MODEL, DATASET)
    _commit(run, "cluster", {}, {"clusters": pd.DataFrame({"c": [0]})})
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    spoil(manifest["stages"]["cluster"]["files"])
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(AdagError, match="the entry of stage 'cluster' is damaged"):
        RunDir.open(tmp_path)


@pytest.mark.parametrize("pending", [[1], {"stage": "cluster"}, {"stage": 3, "entry": {}}])
def test_a_damaged_record_of_an_interrupted_commit_is_one_line(tmp_path, pending):
    RunDir.create(tmp_path, MODEL, DATASET)
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    (tmp_path / MANIFEST).write_text(json.dumps(manifest | {"pending": pending}))
    with pytest.raises(AdagError, match=r"the record of an interrupted commit \('pending'\) is damaged"):
        RunDir.open(tmp_path)


def test_a_commit_that_reproduces_the_finished_result_changes_nothing(tmp_path):
    run = RunDir.create(tmp_path, MODEL, DATASET)
    _commit(run, "cluster", {"k": 3}, {"clusters": pd.DataFrame({"c": [0, 1, 2]})})
    before = snapshot(tmp_path)
    with StageWriter(run, "cluster", {"k": 3}, command="adag cluster elsewhere") as out:
        out.write_table("clusters", pd.DataFrame({"c": [0, 1, 2]}))
        out.facts["rows"] = 3
    assert snapshot(tmp_path) == before
    (tmp_path / "cluster/clusters.parquet").write_bytes(b"x")  # a damaged result is rewritten, not kept
    _commit(run, "cluster", {"k": 3}, {"clusters": pd.DataFrame({"c": [0, 1, 2]})})
    assert RunDir.open(tmp_path).verify(hashes=True) == [] and snapshot(tmp_path) != before


def test_a_moved_run_names_itself_in_its_hints(tmp_path):
    run = RunDir.create(tmp_path / "old", MODEL, DATASET)
    with StageWriter(run, "cluster", {}, command=f"adag cluster {tmp_path / 'old'} --k 3") as out:
        out.write_table("clusters", pd.DataFrame({"c": [0]}))
    (tmp_path / "old").rename(tmp_path / "new place")
    moved = RunDir.open(tmp_path / "new place")
    assert moved.command("cluster") == f"adag cluster '{tmp_path / 'new place'}' --k 3"
    (tmp_path / "new place/cluster/clusters.parquet").write_bytes(b"")
    with pytest.raises(DamagedFile, match="rewrite it with `adag cluster '.*new place' --k 3`"):
        moved.read_table("cluster", "clusters")
