"""How a stage writes into a run: the `Stage` declaration, and the `writing` context every stage
function writes through. Below the stage packages (each declares its stages in its `config.py` and
imports `writing` from here) and below the registry (`adag.stages`) that lists them in order.
Kept light (pydantic only) so that `adag --help` starts fast; the store and the run view are
imported when a stage writes.

A stage function (`StageFunction`) is called as `function(run_dir, config, **options)` and returns a
`StageResult`; its summary (`SummaryFunction`) turns that result into the `Summary` the CLI prints:

    def cluster_run(run_dir: str, config: ClusterConfig) -> StageResult:
        with writing(run_dir, CLUSTER_STAGE, config) as (view, out):
            nodes = view.nodes                       # read through the run view
            out.write_table("clusters", table)       # write through the stage writer
            out.facts["clusters"] = 3                # shown by `adag info`
        return StageResult(view.run)

No stage takes the run's lock: `writing` holds it while it checks the run, decides the config to record
(a partial rerun adds to the finished result), opens the writer (which resumes or repairs) and commits.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from pydantic import BaseModel

if TYPE_CHECKING:
    import pandas as pd

    from adag.store import RunDir, Shard, StageWriter
    from adag.view import RunView


@dataclass(frozen=True)
class StageResult:
    """What every stage function returns: the run it read or wrote, and what its summary reports."""

    run: RunDir
    facts: dict[str, Any] = dataclass_field(default_factory=dict)  # figures outside the manifest (a dry run)
    table: pd.DataFrame | None = None  # the table the summary prints, if it prints one
    file: Path | None = None  # a file written outside the run (report --out, export, figure)


@dataclass(frozen=True)
class Summary:
    """What the CLI prints after a stage, and its exit status: not 0 for a run that finished but must
    not pass as a success (e.g. some prompts had no value)."""

    text: str
    status: int = 0


class StageFunction(Protocol):
    """`Stage.run`: does the stage's work on the run at `run_dir` with `config`; `options` are the
    fields of `Stage.options` (and `lm=`, a model already loaded, for a stage with `model`)."""

    def __call__(self, run_dir: str, config: Any, /, **options: Any) -> StageResult: ...


class SummaryFunction(Protocol):
    """`Stage.summary`: the lines printed after the stage ran."""

    def __call__(self, result: StageResult, /) -> Summary: ...


@dataclass(frozen=True)
class Stage:
    """One command of the pipeline.

    `config` holds the settings that shape the results (recorded in the manifest; a rerun with the
    same config of a resumable stage resumes); `options` what only this invocation needs (another
    model to load, an output path, a dry run). `requires` must be done first; `uses` are read when
    present. The results of a stage are stale once a stage it read is rerun with other results.
    `run` and `summary` are "module:function", imported when the stage runs: a `StageFunction`
    that does the work and the `SummaryFunction` that says what it did. A stage that does not
    `write` into the run (it writes a file elsewhere, e.g. a figure) is a command, not a step of a study.
    """

    name: str
    help: str
    config: type[BaseModel]
    run: str
    summary: str
    requires: tuple[str, ...] = ()
    uses: tuple[str, ...] = ()
    options: type[BaseModel] | None = None
    resumable: bool = False
    model: bool = False  # runs the run's model: `run` also accepts `lm=`, a model already loaded
    run_dir_option: str | None = None  # the option naming the run directory, if not the RUN argument
    writes: bool = True  # commits its results into the run (a step of a study)

    def run_function(self) -> StageFunction:
        return _resolved(self.run)

    def summary_function(self) -> SummaryFunction:
        return _resolved(self.summary)


def _resolved(entry: str) -> Any:
    module, _, name = entry.partition(":")
    return getattr(importlib.import_module(module), name)


def cli_fields(model: type[BaseModel] | None) -> dict[str, Any]:
    """The fields of a settings model that are command-line options (all but those marked cli=False)."""
    if model is None:
        return {}
    return {name: field for name, field in model.model_fields.items()
            if (field.json_schema_extra or {}).get("cli", True)}


def option_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def command_line(stage: Stage, run_dir: str | Path, config: BaseModel | None = None, **options: Any) -> str:
    """The command that makes `stage` with `config` and `options` (options at their defaults left out)."""
    words = ["adag", stage.name] if stage.run_dir_option else ["adag", stage.name, str(run_dir)]
    given = {**(config.model_dump() if config is not None else {}), **options}
    for model in (stage.config, stage.options):
        for name, field in cli_fields(model).items():
            if name not in given or (not field.is_required() and given[name] == field.get_default(
                    call_default_factory=True)):
                continue
            value = given[name]
            if isinstance(value, bool):
                words.append(option_name(name) if value else f"--no-{name.replace('_', '-')}")
            else:
                shown = ",".join(map(str, value)) if isinstance(value, list) else str(value)
                words += [option_name(name), _quoted(shown)]
    return " ".join(words)


def number(value: float | None) -> str:
    """A score in a stage summary: three decimals, or n/a when undefined."""
    return "n/a" if value is None or value != value else f"{value:.3f}"


def _quoted(word: str) -> str:
    return word if word and all(c.isalnum() or c in "-_.,:/@" for c in word) else "'" + word.replace("'", "'\\''") + "'"


def needed(stage: Stage, config: BaseModel) -> tuple[str, ...]:
    """The stages `stage` must find finished: its `requires` and those its settings add (a config
    model may say which with a `needs()` method, e.g. steer --top needs correlate)."""
    extra = config.needs() if hasattr(config, "needs") else ()
    return tuple(dict.fromkeys((*stage.requires, *extra)))


def stage_inputs(run: RunDir, stage: Stage, config: BaseModel) -> dict[str, str]:
    """The ids of the finished stages that `stage` with `config` reads: recorded as its inputs."""
    names = (*needed(stage, config), *stage.uses)
    return {name: run.entry(name)["id"] for name in dict.fromkeys(names) if run.stage_done(name)}


def is_current(run: RunDir, stage: Stage, config: BaseModel) -> bool:
    """Whether `stage` is done, not stale, and was made with `config` from the results it would read
    now, so that running it again would redo the same work."""
    entry = run.entry(stage.name)
    return (run.stage_done(stage.name) and entry["config"] == config.model_dump(mode="json")
            and entry["inputs"] == stage_inputs(run, stage, config))


def reading(run_dir: str | Path, stage: Stage, config: BaseModel) -> RunView:
    """A view of the run for a stage that reads it without writing into it, once the stages it needs
    are found finished and current."""
    from adag.view import RunView

    view = RunView.open(run_dir)
    for name in needed(stage, config):
        view.require(name)
    return view


@contextlib.contextmanager
def writing(run: RunDir | str | Path, stage: Stage, config: BaseModel | Callable[[RunView], BaseModel],
            command: str | None = None, shard: Shard | None = None) -> Iterator[tuple[RunView, StageWriter]]:
    """Write one stage: hold the run's lock (shared with the other shards with `shard`), read the run
    afresh, check the stages it needs, give a view of the run and a StageWriter; the lock is held until
    the results are committed, when the block ends normally. On an exception nothing finished changes.
    The stages read (those needed, and `uses` that are done) are recorded as the result's inputs.

    `config` is the settings to record, or a function of the view that decides them under the lock (a
    partial rerun records the union with the finished result; adag.subsets). A resumable stage resumes
    an unfinished attempt made with the same settings and repairs a finished one; with `shard`, this
    process writes its share of the parts alongside the other shards and commits nothing (StageWriter)."""
    from adag.store import RunDir, StageWriter
    from adag.view import RunView

    run = run if isinstance(run, RunDir) else RunDir.open(run)
    with run.lock(shared=shard is not None):
        run.reload()
        view = RunView(run)
        settled = config(view) if callable(config) else config
        for name in needed(stage, settled):
            view.require(name)
        with StageWriter(run, stage.name, settled.model_dump(mode="json"), stage_inputs(run, stage, settled),
                         stage.resumable, command or command_line(stage, run.path, settled), shard) as out:
            yield view, out
