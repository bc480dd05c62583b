import json

import pandas as pd
import pytest

from adag.errors import AdagError
from adag.store import FORMAT_VERSION, RunDir

MODEL = {"spec": "m", "weights": "w"}
DATASET = {"name": "d", "sha256": "s", "rows": 1}


def test_create_write_read_roundtrip(tmp_path):
    run = RunDir.create(tmp_path / "run", MODEL, DATASET)
    assert run.begin_stage("trace", {"k": 5}) is False  # a first attempt has nothing to keep
    run.write_part("trace", "nodes", 0, pd.DataFrame({"a": [1, 2]}))
    run.write_part("trace", "nodes", 1, pd.DataFrame({"a": [3]}))
    run.finish_stage("trace", nodes=3)
    reopened = RunDir.open(tmp_path / "run")
    assert reopened.read_table("trace", "nodes")["a"].tolist() == [1, 2, 3]
    assert reopened.stage_done("trace")
    assert reopened.manifest["format_version"] == FORMAT_VERSION
    assert not list((tmp_path / "run").rglob("*.tmp")) and not list((tmp_path / "run").rglob("*.pkl"))


def test_changed_config_clears_the_stage(tmp_path):
    run = RunDir.create(tmp_path, MODEL, DATASET)
    run.begin_stage("trace", {"k": 5})
    run.write_part("trace", "nodes", 0, pd.DataFrame({"a": [1]}))
    assert run.begin_stage("trace", {"k": 5}) is True and run.has_part("trace", "nodes", 0)
    assert run.begin_stage("trace", {"k": 3}) is False and not run.has_part("trace", "nodes", 0)


def test_not_a_run_directory(tmp_path):
    with pytest.raises(AdagError, match="is not an adag run directory"):
        RunDir.open(tmp_path)
    (tmp_path / "file").write_text("x")
    with pytest.raises(AdagError, match="is not empty and is not an adag run"):
        RunDir.create(tmp_path, MODEL, DATASET)


def test_incompatible_version_and_damaged_manifest(tmp_path):
    RunDir.create(tmp_path, MODEL, DATASET)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["format_version"] = 999
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(AdagError, match="run format 999"):
        RunDir.open(tmp_path)
    (tmp_path / "manifest.json").write_text("{")
    with pytest.raises(AdagError, match="not valid JSON"):
        RunDir.open(tmp_path)


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


def test_rerunning_a_stage_clears_the_stages_built_on_it(tmp_path):
    run = RunDir.create(tmp_path, MODEL, DATASET)
    for stage in ("trace", "cluster", "describe"):
        run.begin_stage(stage, {})
        run.write_table(stage, "t", pd.DataFrame({"a": [1]}))
        run.finish_stage(stage)
    run.begin_stage("cluster", {"k": 3}, resume=False)
    assert run.stage_done("trace") and (tmp_path / "trace" / "t.parquet").exists()
    assert "describe" not in run.manifest["stages"] and not (tmp_path / "describe" / "t.parquet").exists()
    assert not (tmp_path / "cluster" / "t.parquet").exists()
