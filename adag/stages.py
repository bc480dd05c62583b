"""The pipeline's stages, each declared once: name, settings, what it needs, and the function that runs it.

The CLI builds one command per stage from this table (options from the pydantic models, in pipeline
order); `writing` is how every stage function writes, and `command_line` how a message names the
command that (re)makes a result. Kept light (pydantic only) so that `adag --help` starts fast; stage
functions are imported when they run.

A stage function is called as `function(run_dir, config, **options)`:

    def cluster_run(run_dir: str, config: ClusterConfig) -> RunDir:
        with writing(run_dir, "cluster", config) as (view, out):
            nodes = view.nodes                       # read through the run view
            out.write_table("clusters", table)       # write through the stage writer
            out.facts["clusters"] = 3                # shown by `adag info`
        return view.run
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ValidationError

from adag.cluster.config import ClusterConfig
from adag.describe.config import DescribeConfig, DescribeOptions
from adag.report.config import ExportConfig, ExportOptions, FigureConfig, FigureOptions, ReportConfig, ReportOptions
from adag.steer.config import (
    CorrelateConfig,
    FaithfulnessConfig,
    JudgeConfig,
    MeasureConfig,
    ModelOption,
    SteerConfig,
)
from adag.trace.config import TraceConfig, TraceInputs

if TYPE_CHECKING:
    from adag.store import RunDir, Shard, StageWriter
    from adag.view import RunView


@dataclass(frozen=True)
class Stage:
    """One pipeline stage.

    `config` holds the settings that shape the results (recorded in the manifest; a rerun with the
    same config of a resumable stage resumes); `options` what only this invocation needs (another
    model to load, an output path, a dry run). `requires` must be done first; `uses` are read when
    present. The results of a stage are stale once a stage it read is rerun with other results.
    `run` and `summary` are "module:function": `run(run_dir, config, **options)` does the work,
    `summary(result, run_dir)` is what the CLI prints after it: a string, or (string, exit status)
    for a run that finished but must not exit 0 (e.g. some clusters failed).
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

    def function(self, which: str = "run") -> Callable:
        module, _, name = getattr(self, which).partition(":")
        return getattr(importlib.import_module(module), name)


STAGES: dict[str, Stage] = {stage.name: stage for stage in (
    Stage("trace", "Trace attribution graphs, profiles and edges for every prompt of a dataset.",
          TraceConfig, "adag.trace.run:trace_run", "adag.trace.run:trace_summary", options=TraceInputs,
          resumable=True, run_dir_option="out", model=True),
    Stage("cluster", "Cluster traced half-neurons by their attribution profiles and build the cluster graph.",
          ClusterConfig, "adag.cluster.run:cluster_run", "adag.cluster.run:cluster_summary", requires=("trace",)),
    Stage("describe", "Describe each cluster (what makes it fire, what it makes the model say), score and label it.",
          DescribeConfig, "adag.describe.run:describe_run", "adag.describe.run:describe_summary",
          requires=("cluster",), options=DescribeOptions, resumable=True),
    Stage("measure", "Measure each prompt's behaviour: P(correct answer), a logit difference, or a judge's "
          "yes-rate on sampled generations.", MeasureConfig, "adag.steer.measure:measure_run",
          "adag.steer.measure:measure_summary", requires=("trace",), options=ModelOption, model=True),
    Stage("correlate", "Correlate each cluster's per-prompt attribution with the measure or a numeric metadata "
          "field (Benjamini-Hochberg adjusted).", CorrelateConfig, "adag.steer.correlate:correlate_run",
          "adag.steer.correlate:correlate_summary", requires=("cluster",)),
    Stage("steer", "Scale clusters' half-neurons and measure the answer (the measure, probabilities, logit "
          "changes, KL, top tokens) against random controls.", SteerConfig, "adag.steer.run:steer_run",
          "adag.steer.run:steer_summary", requires=("cluster",), uses=("measure",), options=ModelOption, model=True),
    Stage("faithfulness", "Faithfulness and completeness of node circuits (top nodes kept, the rest ablated).",
          FaithfulnessConfig, "adag.steer.run:faithfulness_run", "adag.steer.run:faithfulness_summary",
          requires=("trace",), options=ModelOption, model=True),
    Stage("judge", "Generate under steering and have a judge LLM answer a yes/no question; "
          "rate = yes / (yes + no).", JudgeConfig, "adag.steer.judge:judge_run", "adag.steer.judge:judge_summary",
          requires=("cluster",), options=ModelOption, model=True),
    Stage("report", "Write the viewer with its data (cluster views, the attribution graphs of the prompts "
          "carrying the most attribution) as one self-contained HTML file.",
          ReportConfig, "adag.report.html:report_run", "adag.report.html:report_summary",
          requires=("cluster",), uses=("describe", "measure", "correlate", "steer"), options=ReportOptions),
    Stage("export", "Export one prompt's graph as Neuronpedia / circuit-tracer graph JSON.",
          ExportConfig, "adag.report.export:export_run", "adag.report.export:export_summary",
          requires=("trace",), uses=("cluster", "describe"), options=ExportOptions),
    Stage("figure", "Draw a prompt's attribution graph (or with --clusters the cluster graph) as a static "
          "picture for papers: .svg, .png or .pdf.", FigureConfig, "adag.report.figure:figure_run",
          "adag.report.figure:figure_summary", requires=("trace",), uses=("cluster", "describe"),
          options=FigureOptions),
)}


def cli_fields(model: type[BaseModel] | None) -> dict[str, Any]:
    """The fields of a settings model that are command-line options (all but those marked cli=False)."""
    if model is None:
        return {}
    return {name: field for name, field in model.model_fields.items()
            if (field.json_schema_extra or {}).get("cli", True)}


def option_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def command_line(stage: str, run_dir: str | Path, config: BaseModel | None = None, **options: Any) -> str:
    """The command that makes `stage` with `config` and `options` (options at their defaults left out)."""
    spec = STAGES[stage]
    words = ["adag", stage] if spec.run_dir_option else ["adag", stage, str(run_dir)]
    given = {**(config.model_dump() if config is not None else {}), **options}
    for model in (spec.config, spec.options):
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


def needed(stage: str, config: BaseModel) -> tuple[str, ...]:
    """The stages `stage` must find finished: its `requires` and those its settings add (a config
    model may say which with a `needs()` method, e.g. steer --top needs correlate)."""
    extra = config.needs() if hasattr(config, "needs") else ()
    return tuple(dict.fromkeys((*STAGES[stage].requires, *extra)))


def stage_inputs(run: RunDir, stage: str, config: BaseModel) -> dict[str, str]:
    """The ids of the finished stages that `stage` with `config` reads: recorded as its inputs."""
    names = (*needed(stage, config), *STAGES[stage].uses)
    return {name: run.entry(name)["id"] for name in dict.fromkeys(names) if run.stage_done(name)}


def is_current(run: RunDir, stage: str, config: BaseModel) -> bool:
    """Whether `stage` is done, not stale, and was made with `config` from the results it would read
    now, so that running it again would redo the same work."""
    entry = run.entry(stage)
    return (run.stage_done(stage) and entry["config"] == config.model_dump(mode="json")
            and entry["inputs"] == stage_inputs(run, stage, config))


@contextlib.contextmanager
def writing(run: RunDir | str | Path, stage: str, config: BaseModel, command: str | None = None,
            shard: Shard | None = None) -> Iterator[tuple[RunView, StageWriter]]:
    """Write one stage: hold the run's lock, check the stages it needs, give a fresh view of the
    run and a StageWriter. The results are committed when the block ends normally; on an exception
    nothing finished changes. The stages read (those needed, and `uses` that are done) are recorded
    as the result's inputs. With `shard`, this process writes its share of a resumable stage's parts
    alongside the other shards and commits nothing (see StageWriter)."""
    from adag.store import RunDir
    from adag.view import RunView

    spec = STAGES[stage]
    run = run if isinstance(run, RunDir) else RunDir.open(run)
    with run.lock(shared=shard is not None):
        run.reload()
        view = RunView(run)
        for name in needed(stage, config):
            view.require(name)
        with run.stage(stage, config.model_dump(mode="json"), stage_inputs(run, stage, config), spec.resumable,
                       command or command_line(stage, run.path, config), shard) as out:
            yield view, out


def validation_line(error: ValidationError, given: dict[str, Any] | None = None,
                    name: Callable[[str], str] = option_name) -> str:
    """A pydantic error as one line: the setting (as `name` spells it), what was given, what is
    expected. A rule over several settings has no single name; its message names them."""
    problems: dict[str, list[str]] = {}
    for item in error.errors():
        field = str(item["loc"][0]) if item["loc"] else ""
        message = "not a known setting" if item["type"] == "extra_forbidden" else item["msg"]
        problems.setdefault(field, []).append(message[0].lower() + message[1:])
    field, messages = next(iter(problems.items()))
    if not field:
        return " or ".join(dict.fromkeys(messages))
    shown = f" (got {given[field]!r})" if given and given.get(field) is not None else ""
    return f"{name(field)}{shown}: {' or '.join(dict.fromkeys(messages))}"
