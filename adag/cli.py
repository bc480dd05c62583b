"""The `adag` command: one subcommand per pipeline stage, built from the stage registry (adag.stages),
plus a few commands to look around. Every error is one line on stderr and exit status 2."""

from __future__ import annotations

import gc
import inspect
import logging
import signal
import sqlite3
import sys
import typing
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Annotated, Any

import typer
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo
from typer.core import TyperGroup

from adag.errors import MAX_JSON_DEPTH, AdagError
from adag.outputs import printable
from adag.pipeline import Stage, cli_fields, option_name, reading
from adag.stages import STAGES, STEPS, validation_line

try:  # typer >= 0.22 carries its own copy of click
    from typer._click import exceptions as click_errors
except ImportError:
    from click import exceptions as click_errors


def stage_command(stage: Stage) -> Callable[..., None]:
    """A typer command whose options are the fields of the stage's settings models: one source for
    names, defaults, help and validation (pydantic validates what the user typed)."""
    fields = {**cli_fields(stage.config), **cli_fields(stage.options)}
    parameters = [] if stage.run_dir_option else [inspect.Parameter(
        "run_dir", inspect.Parameter.POSITIONAL_OR_KEYWORD,
        annotation=Annotated[str, typer.Argument(metavar="RUN", help="the run directory", show_default=False)])]
    parameters += [_parameter(name, field) for name, field in fields.items()]

    def command(run_dir: str | None = None, **given: Any) -> None:
        options = settings(stage.options, given).model_dump() if stage.options else {}  # where to write, first
        config = settings(stage.config, given)
        if stage.run_dir_option:
            run_dir = options.pop(stage.run_dir_option)
        if not stage.writes:  # a writing stage checks what it needs under the run's lock
            reading(run_dir, stage, config)
        with first_imports_uncollected():
            run, summarize = stage.run_function(), stage.summary_function()
        summary = summarize(run(run_dir, config, **options))
        echo(summary.text)
        if summary.status:
            raise typer.Exit(summary.status)

    command.__signature__ = inspect.Signature(parameters)
    command.__annotations__ = {p.name: p.annotation for p in parameters}
    command.__doc__ = stage.help
    return command


@contextmanager
def first_imports_uncollected() -> Iterator[None]:
    """Load a stage's modules (torch, transformers: millions of long-lived objects) with the cyclic garbage
    collector paused, then freeze what they made out of later collections. Otherwise each full collection
    walks them all, while they load and again at exit: more than a second of a command's start-up. Only in
    a process that this command brings torch into (a fresh `adag`), after a collection: a process that has
    torch already (a notebook, the tests) keeps its collector as it is."""
    if "torch" in sys.modules or not gc.isenabled():
        yield
        return
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        gc.enable()


def _parameter(name: str, field: FieldInfo) -> inspect.Parameter:
    """An option typed as text (None when not given), so that pydantic alone parses and validates."""
    help_text = field.description or ""
    choices = _choices(field.annotation)
    if choices and _only_choices(field.annotation):
        help_text += f" (one of: {', '.join(choices)})"
    if not field.is_required():
        default = field.get_default(call_default_factory=True)
        shown = ",".join(map(str, default)) if isinstance(default, list) else default
        help_text += f"  [default: {shown}]" if default is not None else ""
    if field.annotation is bool:
        option = typer.Option(f"{option_name(name)}/--no-{name.replace('_', '-')}", help=help_text,
                              show_default=False)
        return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None,
                                 annotation=Annotated[bool | None, option])
    option = typer.Option(option_name(name), help=help_text, show_default=False,
                          metavar=_metavar(field.annotation, choices))
    if field.is_required():
        return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=Annotated[str, option])
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None,
                             annotation=Annotated[str | None, option])


def _choices(annotation: Any) -> list[str]:
    if typing.get_origin(annotation) is typing.Literal:
        return [str(a) for a in typing.get_args(annotation)]
    return [c for arg in typing.get_args(annotation) for c in _choices(arg)]


def _only_choices(annotation: Any) -> bool:
    """Whether every value the option takes is one of its listed words (no free number or text)."""
    if typing.get_origin(annotation) is typing.Literal:
        return True
    arguments = typing.get_args(annotation)
    return bool(arguments) and all(typing.get_origin(a) is typing.Literal for a in arguments)


def _is_list(annotation: Any) -> bool:
    return typing.get_origin(annotation) is list or any(_is_list(a) for a in typing.get_args(annotation))


def _metavar(annotation: Any, choices: list[str]) -> str:
    if _is_list(annotation):
        return "A,B,..."
    kinds = {int: "INTEGER", float: "NUMBER"}
    for arg in (annotation, *typing.get_args(annotation)):
        if typing.get_origin(arg) is Annotated:  # a constrained number, e.g. Annotated[int, Field(ge=2)]
            arg = typing.get_args(arg)[0]
        if arg in kinds:
            return kinds[arg] + ("|" + "|".join(choices) if choices else "")
    return "TEXT"


def settings(model: type[BaseModel], given: dict[str, Any]) -> BaseModel:
    """Validate the options the user gave (the rest keep the model's defaults). Lists are typed
    comma-separated. A problem is an AdagError naming the option."""
    values = {}
    for name, field in cli_fields(model).items():
        value = given.get(name)
        if value is None:
            continue
        if _is_list(field.annotation) and isinstance(value, str):
            value = [item.strip() for item in value.split(",") if item.strip()]
        values[name] = value
    try:
        return model.model_validate(values)
    except ValidationError as error:
        raise AdagError(validation_line(error, given)) from None


class AdagGroup(TyperGroup):
    """The command group: every error becomes one line on stderr and exit status 2."""

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        notes = StderrNotes()
        logging.getLogger("adag").addHandler(notes)
        previous = _terminate_as_interrupt()
        try:
            result = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click_errors.NoArgsIsHelpError as error:
            typer.echo(error.ctx.get_help())
            result = 0
        except click_errors.ClickException as error:
            _fail(" ".join(error.format_message().split()))
        except Terminated:
            _fail("terminated; rerun the same command to resume where it stopped", code=128 + signal.SIGTERM)
        except (typer.Abort, KeyboardInterrupt):
            _fail(INTERRUPTED, code=INTERRUPTED_STATUS)
        except AdagError as error:
            _fail(str(error))
        except ValidationError as error:
            _fail(validation_line(error))
        except OSError as error:  # a file adag had no reason to expect unreadable or unwritable
            _fail(_os_error_line(error))
        except sqlite3.Error as error:  # the only database is the LLM cache
            _fail(f"the LLM cache cannot be used ({error}); move llm-cache.sqlite out of the cache folder "
                  "($ADAG_CACHE, default ~/.cache/adag), or set ADAG_CACHE to another folder")
        except RecursionError:
            _fail(f"an input is nested too deeply (over {MAX_JSON_DEPTH} levels of lists or objects); flatten it")
        finally:
            logging.getLogger("adag").removeHandler(notes)
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
        if result == INTERRUPTED_STATUS:  # typer turns Ctrl-C into this status without a word
            _fail(INTERRUPTED, code=INTERRUPTED_STATUS)
        if standalone_mode:
            sys.exit(result if isinstance(result, int) else 0)
        return result


INTERRUPTED = "interrupted; rerun the same command to resume where it stopped"
INTERRUPTED_STATUS = 130


class Terminated(BaseException):
    """SIGTERM, raised where the process is, so that locks are released and unfinished stages set aside
    exactly as for Ctrl-C."""


def _terminate_as_interrupt() -> typing.Any:
    """Turn SIGTERM into `Terminated` while a command runs (main thread only); the handler it replaced."""
    def terminate(_signal: int, _frame: typing.Any) -> None:
        raise Terminated

    try:
        return signal.signal(signal.SIGTERM, terminate)
    except ValueError:  # not the main thread (e.g. a test runner's worker)
        return None


def _os_error_line(error: OSError) -> str:
    """An operating-system error as one line naming the file and what to do."""
    where = f" {error.filename}" if error.filename else ""
    if isinstance(error, PermissionError):
        return f"no permission for{where} ({error.strerror}); check its permissions (chmod) or choose another path"
    return f"cannot use{where} ({error.strerror or error}); check that it exists and is a file or folder you may use"


class StderrNotes(logging.Handler):
    """Warnings from the library (e.g. damaged parts being redone), one line each on stderr."""

    def __init__(self):
        super().__init__(logging.WARNING)

    def emit(self, record: logging.LogRecord) -> None:
        typer.echo(f"warning: {printable(record.getMessage())}", err=True)


def _fail(message: str, code: int = 2) -> typing.NoReturn:
    typer.echo(f"error: {printable(message)}", err=True)
    sys.exit(code)


def echo(text: str) -> None:
    """Print lines that may hold text from models, LLMs or datasets, without their control characters."""
    typer.echo(printable(text, lines=True))


app = typer.Typer(
    cls=AdagGroup,
    help="Trace and describe circuits of MLP neurons in transformer language models (ADAG).\n\n"
    f"Pipeline, in order: {' -> '.join(STEPS)}; then {', '.join(s for s in STAGES if s not in STEPS)} write "
    "files from a run. Start with `adag models` and `adag datasets`; "
    "`adag info RUN` shows what a run holds.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


for _stage in STAGES.values():  # the pipeline first, in order
    app.command(_stage.name, help=_stage.help)(stage_command(_stage))


@app.command("run", help="Run a whole study from one TOML file (model, dataset, each stage's settings); stages "
             "already done with the same settings and inputs are skipped. Examples in examples/.")
def run_study_command(
    study: Annotated[str, typer.Argument(metavar="STUDY.toml", help="a study file (see examples/)")],
) -> None:
    """Run a whole study from one TOML file: model, dataset and each stage's settings. Stages run in
    pipeline order; those already done with the same settings and inputs are skipped, so a rerun
    resumes where it stopped and a changed setting reruns that stage and the ones that read it."""
    from adag.study import run_study

    status = max((outcome.summary.status for outcome in run_study(study, echo=echo)), default=0)
    if status:
        raise typer.Exit(status)


@app.command()
def models() -> None:
    """List the built-in models and the supported model families."""
    from adag.models import ADAPTERS, BUILTIN_MODELS

    typer.echo("Built-in models (no download needed; base models get plain prompts, see trace --prompt-format):")
    typer.echo(f"  {'name':19s} {'family':12s} {'size':5s} {'kind':9s} {'upstream':35s} {'license':19s} description")
    for name, b in BUILTIN_MODELS.items():
        typer.echo(f"  {name:19s} {b.family:12s} {b.size:5s} {b.tuning:9s} {b.upstream:35s} {b.license:19s} "
                   f"{b.description}")
    typer.echo("\nAlso accepted: a local Hugging Face model directory, or a hub id such as org/name.")
    typer.echo(f"Supported families (config.model_type): {', '.join(sorted(ADAPTERS))}")


@app.command()
def datasets() -> None:
    """List the built-in datasets with their sizes."""
    from adag.datasets import BUILTIN_DATASETS

    typer.echo("Built-in datasets:")
    for name, (make, description) in BUILTIN_DATASETS.items():
        typer.echo(f"  {name:20s} {len(make()):4d} prompts  {description}")
    typer.echo("\nOr a .jsonl/.csv file with fields prompt, seed_response, labels (list) and metadata.")


@app.command()
def info(
    run_dir: Annotated[str, typer.Argument(help="a run directory")],
    verify: Annotated[bool, typer.Option("--verify", help="also check every file's SHA-256 (reads them all)")]
    = False,
) -> None:
    """Summarise a run: model, dataset, stages with status, timings and facts; check the files.
    Exit status 1 when a file is missing or damaged."""
    import json

    from adag.store import ENTRY_KEYS, RunDir

    run = RunDir.open(run_dir)
    manifest = run.manifest
    model, dataset = manifest["model"], manifest["dataset"]
    echo(f"run      {run_dir}  (adag {manifest['adag_version']}, created {manifest['created']})")
    echo(f"model    {model.get('spec')}  family={model.get('family')} layers={model.get('layers')} "
         f"neurons/layer={model.get('neurons')} weights={model.get('weights')}")
    echo(f"dataset  {dataset.get('name')}  rows={dataset.get('rows')} sha256={dataset.get('sha256')}")
    for stage, entry in manifest["stages"].items():
        facts = {k: v for k, v in entry.items() if k not in ENTRY_KEYS}
        seconds = entry.get("seconds")
        timing = f"{seconds:.1f}s" if isinstance(seconds, int | float) else "-"
        echo(f"stage    {stage:12s} {run.stage_state(stage):6s} {timing:>8s}  {json.dumps(facts)}")
    for stage in STAGES:
        attempt = run.staged_attempt(stage)
        if attempt:
            echo(f"staged   {stage:12s} an unfinished attempt with finished parts; rerun it to resume")
    problems = run.verify(hashes=verify)
    for problem in problems:
        echo(f"damaged  {problem}")
    if problems:
        raise typer.Exit(1)


@app.command()
def serve(
    run_dir: Annotated[str, typer.Argument(help="a clustered run directory")],
    host: Annotated[str, typer.Option(help="address to bind (127.0.0.1 keeps it on this machine)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="port (0 picks a free one)")] = 8000,
) -> None:
    """Browse a run: cluster graph, cluster panels, every prompt's attribution graph (loaded on demand)."""
    from adag.report import make_server
    from adag.report.html import warn_stale
    from adag.view import RunView

    server = make_server(run_dir, host, port)
    warn_stale(RunView.open(run_dir))
    typer.echo(f"serving {run_dir} at http://{host}:{server.server_port}/  (Ctrl-C to stop)")
    try:
        server.serve_forever()
    except (KeyboardInterrupt, Terminated):  # the way to stop a server
        pass
    finally:  # no steer left running in a thread as the process exits
        server.server_close()
