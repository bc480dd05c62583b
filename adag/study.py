"""`adag run STUDY.toml`: a whole pipeline described by one file, run stage by stage.

A study file holds the run's identity at the top (the options of `adag trace` that are not settings:
model, dataset, out, limit, dtype, device) and one table per stage with that stage's settings, the
same settings (and validation) as its command's options::

    model = "smollm2-135m"
    dataset = "misleading-capitals"
    out = "runs/misleading-capitals"

    [trace]
    metric = "logit_diff"
    [cluster]
    k = 20
    [measure]
    measure = "p_correct"
    [correlate]
    [steer]
    top = 3

The trace always runs; another stage runs when its table is there (an empty table takes the
defaults), in the registry's order. A stage that is current (done, not stale, same settings, same
inputs) is skipped, so a rerun does no work and a changed setting reruns that stage and the stages
that read its results. Relative paths are taken from the current directory, as on the command line.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from adag.errors import AdagError
from adag.pipeline import StageResult, Summary, is_current, needed
from adag.stages import STAGES, STEPS, validation_line
from adag.trace.config import TraceInputs

if sys.version_info >= (3, 11):
    import tomllib
else:  # the same parser, from PyPI, before it joined the standard library
    import tomli as tomllib



@dataclass
class Study:
    path: Path
    inputs: TraceInputs
    configs: dict[str, BaseModel]  # stage -> settings, in pipeline order (trace first)

    @property
    def run_dir(self) -> Path:
        return Path(self.inputs.out)


def load_study(path: str | Path) -> Study:
    """Read and check a study file: unknown keys, wrong types and missing stages are one-line errors
    naming the key."""
    path = Path(path)
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AdagError(f"no study file {path}") from None
    except (OSError, UnicodeDecodeError) as error:
        raise AdagError(f"cannot read {path} ({error})") from None
    except tomllib.TOMLDecodeError as error:
        raise AdagError(f"{path} is not valid TOML: {error}") from None
    for key in document:
        if key in STAGES and key not in STEPS:
            raise AdagError(f"{path}: [{key}] is a command that writes a file outside the run, not a step of a "
                            f"study; remove the table and run `adag {key} {document.get('out', 'RUN')} ...` after "
                            "the study")
    sections = {key: value for key, value in document.items() if key in STEPS}
    top = {key: value for key, value in document.items() if key not in STEPS}
    inputs = _validated(TraceInputs, top, path, lambda key: key, "")
    for key in ("model", "dataset", "out"):
        if getattr(inputs, key) is None:
            raise AdagError(f"{path}: {key}: field required; add `{key} = \"...\"` at the top of the study file")
    if inputs.shard is not None or inputs.finish is not None:
        raise AdagError(f"{path}: a study runs in one process; trace in shards with `adag trace --shard I/N` "
                        "and `--finish`, then `adag run` the study on that run directory")
    configs = {}
    for stage in STEPS:
        if stage != "trace" and stage not in sections:
            continue
        section = sections.get(stage, {})
        if not isinstance(section, dict):
            raise AdagError(f"{path}: '{stage}' must be a table ([{stage}]) of its settings")
        configs[stage] = _validated(STAGES[stage].config, section, path, lambda key, s=stage: f"[{s}] {key}",
                                    f"[{stage}] ")
    for stage, config in configs.items():
        for name in needed(STAGES[stage], config):
            if name not in configs:
                raise AdagError(f"{path}: [{stage}] needs the {name} stage; add a [{name}] table "
                                "(empty for its defaults)")
    return Study(path, inputs, configs)


def _validated(model: type[BaseModel], values: dict[str, Any], path: Path, name: Callable[[str], str],
               where: str) -> BaseModel:
    try:
        return model.model_validate(values)
    except ValidationError as error:
        if any(item["type"] == "extra_forbidden" for item in error.errors()):
            unknown = next(str(item["loc"][0]) for item in error.errors() if item["type"] == "extra_forbidden")
            known = [*model.model_fields, *(STEPS if not where else [])]
            expected = f"known keys: {', '.join(known)}" if known else "it takes no keys"
            raise AdagError(f"{path}: {where}unknown key '{unknown}'; {expected}") from None
        raise AdagError(f"{path}: {validation_line(error, values, name)}") from None


@dataclass
class StageOutcome:
    stage: str
    ran: bool
    seconds: float
    summary: Summary  # empty for a stage skipped as current


def run_study(path: str | Path, echo: Callable[[str], None] = print) -> list[StageOutcome]:
    """Run a study: each stage in order, skipping those that are current. The model is loaded once,
    when the first stage that needs it runs."""
    from adag.datasets import load_dataset
    from adag.models import load_model
    from adag.store import MANIFEST, RunDir

    study = load_study(path)
    inputs = study.inputs
    device_type = _device_type(inputs.device)
    study.configs = {stage: config.for_device(device_type) if hasattr(config, "for_device") else config
                     for stage, config in study.configs.items()}  # as the stage records them
    dataset = load_dataset(inputs.dataset, limit=inputs.limit)
    if (study.run_dir / MANIFEST).exists():
        _check_identity(RunDir.open(study.run_dir), inputs, dataset)
    loaded: dict[str, Any] = {}

    def model():
        if "lm" not in loaded:
            loaded["lm"] = load_model(inputs.model, dtype=inputs.dtype, device=inputs.device)
        return loaded["lm"]

    outcomes = []
    echo(f"study {study.path} -> {study.run_dir}: {', '.join(study.configs)}")
    for number, (stage, config) in enumerate(study.configs.items(), start=1):
        head = f"[{number}/{len(study.configs)}] {stage}"
        run = RunDir.open(study.run_dir) if (study.run_dir / MANIFEST).exists() else None
        if run is not None and is_current(run, STAGES[stage], config):
            echo(f"{head}: current (same settings and inputs), skipped")
            outcomes.append(StageOutcome(stage, False, 0.0, Summary("")))
            continue
        echo(f"{head}: running")
        started = time.perf_counter()
        summary = STAGES[stage].summary_function()(_run_stage(stage, config, study, model))
        seconds = time.perf_counter() - started
        echo(f"{head}: done in {seconds:.1f}s\n" + "\n".join(f"    {line}" for line in summary.text.splitlines()))
        outcomes.append(StageOutcome(stage, True, seconds, summary))
    echo(study_digest(study.run_dir))
    return outcomes


def _run_stage(stage: str, config: BaseModel, study: Study, model: Callable) -> StageResult:
    spec = STAGES[stage]
    options: dict[str, Any] = {"lm": model()} if spec.model else {}
    if spec.run_dir_option:  # the stage that creates the run takes the run's identity
        options.update(study.inputs.model_dump(exclude={spec.run_dir_option}))
    return spec.run_function()(str(study.run_dir), config, **options)


def _device_type(device: str) -> str:
    """The kind of device ("cpu", "cuda", ...) the study's model will be on, before it is loaded."""
    import torch

    from adag.models.placement import AUTO, resolve_device

    target = resolve_device(device)
    if target != AUTO:
        return target.type
    accelerator = torch.accelerator.current_accelerator()
    return accelerator.type if accelerator is not None else "cpu"


def _check_identity(run, inputs: TraceInputs, dataset) -> None:
    """The study's model and dataset must be the run's: a study file edited to another model or
    dataset must not mix results in one directory."""
    model, recorded = run.manifest["model"], run.manifest["dataset"]
    if model.get("spec") != inputs.model:
        raise AdagError(f"{run.path} holds a run of model '{model.get('spec')}', not '{inputs.model}'; "
                        "give the study another out directory or delete this one")
    if recorded.get("sha256") != dataset.sha256:
        raise AdagError(f"{run.path} holds a run of another dataset ({recorded.get('name')}, "
                        f"{recorded.get('rows')} rows); give the study another out directory or delete this one")


def study_digest(run_dir: str | Path) -> str:
    """What a study found, in a few lines: how many clusters correlate significantly with the
    measure, and for each steered cluster the change of the mean measure and its percentile among
    each kind of control."""
    from adag.view import RunView

    view = RunView.open(run_dir)
    lines = []
    correlation = view.table("correlate", "correlation")
    if correlation is not None:
        config = view.config("correlate")
        lines.append(f"{int(correlation['significant'].sum())} of {len(correlation)} clusters correlate "
                     f"significantly with {config['field']} ({config['method']}, Benjamini-Hochberg q < "
                     f"{config['alpha']})")
    controls = view.table("steer", "controls")
    if controls is not None:
        measure = view.run.entry("steer").get("measure", "measure")
        labels = view.labels
        for cluster, group in controls.groupby("cluster", sort=False):
            parts = []
            for multiplier, by_kind in group.groupby("multiplier"):
                ranks = ", ".join(f"percentile {row.percentile:.0f} among {row.kind}" for row in by_kind.itertuples())
                parts.append(f"x{multiplier:g}: {by_kind['change'].iloc[0]:+.4f} ({ranks})")
            lines.append(f"cluster {cluster} ({labels.get(int(cluster), '')}): change of mean {measure} "
                         + "; ".join(parts))
    if view.has("report"):
        lines.append(f"report: {view.path / 'report' / 'report.html'}")
    return "\n".join(lines)
