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

from pydantic import BaseModel

from adag.cluster.config import ClusterConfig
from adag.describe.config import DescribeConfig, DescribeOptions
from adag.report.config import ExportConfig, ExportOptions, FigureConfig, FigureOptions, ReportConfig, ReportOptions
from adag.steer.config import CorrelateConfig, FaithfulnessConfig, JudgeConfig, ModelOption, SteerConfig
from adag.trace.config import TraceConfig, TraceInputs

if TYPE_CHECKING:
    from adag.store import RunDir, StageWriter
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
    run_dir_option: str | None = None  # the option naming the run directory, if not the RUN argument

    def function(self, which: str = "run") -> Callable:
        module, _, name = getattr(self, which).partition(":")
        return getattr(importlib.import_module(module), name)


STAGES: dict[str, Stage] = {stage.name: stage for stage in (
    Stage("trace", "Trace attribution graphs, profiles and edges for every prompt of a dataset.",
          TraceConfig, "adag.trace.run:trace_command", "adag.trace.run:trace_summary", options=TraceInputs,
          resumable=True, run_dir_option="out"),
    Stage("cluster", "Cluster traced half-neurons by their attribution profiles and build the cluster graph.",
          ClusterConfig, "adag.cluster.run:cluster_run", "adag.cluster.run:cluster_summary", requires=("trace",)),
    Stage("describe", "Describe each cluster (what makes it fire, what it makes the model say), score and label it.",
          DescribeConfig, "adag.describe.run:describe_run", "adag.describe.run:describe_summary",
          requires=("cluster",), options=DescribeOptions, resumable=True),
    Stage("steer", "Scale clusters' half-neurons and measure the answer: probabilities, logit changes, KL, "
          "top tokens.", SteerConfig, "adag.steer.run:steer_run", "adag.steer.run:steer_summary",
          requires=("cluster",), options=ModelOption),
    Stage("faithfulness", "Faithfulness and completeness of node circuits (top nodes kept, the rest ablated).",
          FaithfulnessConfig, "adag.steer.run:faithfulness_stage", "adag.steer.run:faithfulness_summary",
          requires=("trace",), options=ModelOption),
    Stage("correlate", "Correlate each cluster's per-prompt attribution with a numeric metadata field.",
          CorrelateConfig, "adag.steer.correlate:correlate_run", "adag.steer.correlate:correlate_summary",
          requires=("cluster",)),
    Stage("judge", "Generate under steering and have a judge LLM answer a yes/no question; "
          "rate = yes / (yes + no).", JudgeConfig, "adag.steer.judge:judge_run", "adag.steer.judge:judge_summary",
          requires=("cluster",), options=ModelOption),
    Stage("report", "Write the viewer with its data (cluster views, the attribution graphs of the prompts "
          "carrying the most attribution) as one self-contained HTML file.",
          ReportConfig, "adag.report.html:report_command", "adag.report.html:report_summary",
          requires=("cluster",), uses=("describe", "steer"), options=ReportOptions),
    Stage("export", "Export one prompt's graph as Neuronpedia / circuit-tracer graph JSON.",
          ExportConfig, "adag.report.export:export_command", "adag.report.export:export_summary",
          requires=("trace",), uses=("cluster", "describe"), options=ExportOptions),
    Stage("figure", "Draw a prompt's attribution graph (or with --clusters the cluster graph) as a static "
          "picture for papers: .svg, .png or .pdf.", FigureConfig, "adag.report.figure:figure_command",
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


@contextlib.contextmanager
def writing(run: RunDir | str | Path, stage: str, config: BaseModel,
            command: str | None = None) -> Iterator[tuple[RunView, StageWriter]]:
    """Write one stage: hold the run's lock, check the stages it requires, give a fresh view of the
    run and a StageWriter. The results are committed when the block ends normally; on an exception
    nothing finished changes. The stages read (`requires`, and `uses` that are done) are recorded as
    the result's inputs."""
    from adag.store import RunDir
    from adag.view import RunView

    spec = STAGES[stage]
    run = run if isinstance(run, RunDir) else RunDir.open(run)
    with run.lock():
        run.reload()
        view = RunView(run)
        for needed in spec.requires:
            view.require(needed)
        inputs = {name: run.entry(name)["id"] for name in (*spec.requires, *spec.uses) if run.stage_done(name)}
        with run.stage(stage, config.model_dump(mode="json"), inputs, spec.resumable,
                       command or command_line(stage, run.path, config)) as out:
            yield view, out
