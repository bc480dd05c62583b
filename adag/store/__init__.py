"""The run directory every stage reads and writes: a JSON manifest and Parquet tables.

Layout::

    RUN/manifest.json                 adag version, model, dataset, and per stage: config, inputs, files
    RUN/<stage>/<table>.parquet       a stage's finished results, in a folder it alone owns
    RUN/<stage>/<table>/part-<n>.parquet   tables written in parts by long, resumable stages
    RUN/.staging/<stage>/             a stage's results while it runs; moved into place when complete
    RUN/.lock                         held (flock) by the one process writing the run, or shared by the
                                      shard writers of one resumable stage (`Shard`)

Nothing finished is deleted before its replacement is complete: a stage writes into
`.staging/<stage>/` and only on success swaps it in (`StageWriter`). A failed or interrupted stage
leaves the results and the manifest as they were. A stage's manifest entry records the ids of the
stages it read (`inputs`); when one of those is recommitted with other results, the entry is
*stale*: its files stay until the stage is rerun, but readers refuse it. Every committed file's
size and SHA-256 are recorded, so a damaged file is named (with the command that rewrites it)
instead of failing deep inside a reader.

A resumable stage can be written by several processes at once, each a `Shard` owning every
count-th part; each records its parts in its own sidecar, and a final writer checks that every
part is there and commits (see `StageWriter`).

Every write goes to a temporary file that is renamed into place. Nothing is pickled: a run
directory is safe to open.

Modules, lowest first: `files` (atomic writes, file records), `lock` (the run's lock), `manifest`
(its format), `staging` (an unfinished attempt's sidecars, `Shard`), `run` (RunDir), `writer`
(StageWriter, which commits into a RunDir).
"""

from adag.store.files import (
    DamagedFile,
    atomic_write_bytes,
    file_problem,
    file_record,
    parquet_bytes,
    part_file,
    part_number,
)
from adag.store.lock import LOCK, RunLocked
from adag.store.manifest import ENTRY_KEYS, FORMAT_VERSION, MANIFEST, STAGING, check_run_target, read_manifest
from adag.store.run import RunDir
from adag.store.staging import Shard
from adag.store.writer import StageWriter

__all__ = ["DamagedFile", "atomic_write_bytes", "file_problem", "file_record", "parquet_bytes", "part_file",
           "part_number", "LOCK", "RunLocked", "ENTRY_KEYS", "FORMAT_VERSION", "MANIFEST", "STAGING",
           "check_run_target", "read_manifest", "RunDir", "Shard", "StageWriter"]
