"""The stage contract: every entry point the registry declares resolves, has the `StageFunction` shape
(run directory, config, options) and, called on a tiny run the way the CLI and a study call it,
returns a `StageResult` that its summary turns into a `Summary`."""

import inspect
import typing

import pytest

from adag.pipeline import StageResult, Summary, cli_fields
from adag.stages import STAGES
from adag.view import RunView
from tests.fake_openai import FakeOpenAI

# Each stage's settings and options on a tiny run (three prompts, the tiny Llama, a fake LLM server for
# `{llm}`); `{run}` and `{tmp}` are filled in. Every registered stage must be here.
CALLS = {
    "trace": ({"threshold": 0.03}, {"out": "{run}", "model": "tiny-llama", "dataset": "country-capitals",
                                    "limit": 3}),
    "cluster": ({"k": 2}, {}),
    "describe": ({"explainer": "{llm}", "simulator": "{llm}", "samples": 1}, {"progress": False}),
    "measure": ({"measure": "p_top"}, {}),
    "correlate": ({}, {}),
    "steer": ({"clusters": [0], "multipliers": [0.0, 1.0]}, {"progress": False}),
    "faithfulness": ({"fractions": [0.5]}, {}),
    "judge": ({"cluster": 0, "question": "Is it a city?", "judge": "{llm}", "samples": 1, "max_new_tokens": 2,
               "multipliers": [1.0]}, {}),
    "report": ({}, {}),
    "export": ({}, {"prompt": 0, "out": "{tmp}/graph.json"}),
    "figure": ({"prompt": 0}, {"out": "{tmp}/graph.svg"}),
}


def test_every_stage_has_a_call_here():
    assert set(CALLS) == set(STAGES)


@pytest.mark.parametrize("name", list(STAGES))
def test_every_entry_point_resolves_to_the_stage_function_shape(name):
    stage = STAGES[name]
    run, summary = stage.run_function(), stage.summary_function()
    assert typing.get_type_hints(run)["return"] is StageResult
    assert typing.get_type_hints(summary)["return"] is Summary
    parameters = list(inspect.signature(run).parameters.values())
    assert [p.name for p in parameters[:2]] == ["run_dir", "config"]
    assert typing.get_type_hints(run)["config"] is stage.config
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)
    named = {p.name for p in parameters[2:]}
    options = set(cli_fields(stage.options)) - {stage.run_dir_option}
    assert takes_any or options <= named, f"{stage.run} does not take the options {options - named}"
    assert not stage.model or takes_any or "lm" in named, f"{stage.run} does not take a loaded model (lm=)"
    assert len(inspect.signature(summary).parameters) == 1


def test_every_entry_point_returns_a_stage_result(tiny_models, tmp_path, monkeypatch):
    """Every stage in pipeline order on one tiny run, called as the CLI calls it."""
    monkeypatch.setenv("ADAG_CACHE", str(tmp_path / "cache"))
    run_dir = str(tmp_path / "run")
    with FakeOpenAI() as server:
        for name, stage in STAGES.items():
            settings, options = (_filled(part, run_dir, tmp_path, f"openai:fake@{server.url}")
                                 for part in CALLS[name])
            if stage.model:
                options["lm"] = tiny_models["llama"]
            given = options.pop(stage.run_dir_option) if stage.run_dir_option else run_dir
            result = stage.run_function()(given, stage.config.model_validate(settings), **options)
            assert isinstance(result, StageResult), name
            assert result.run.path == tmp_path / "run"
            summary = stage.summary_function()(result)
            assert isinstance(summary, Summary) and summary.text and summary.status == 0, name
            assert stage.writes == RunView.open(run_dir).has(name), name
            assert stage.writes or result.file.is_file(), name  # a command writes a file outside the run


def _filled(values: dict, run_dir: str, tmp_path, llm: str) -> dict:
    return {key: value.format(run=run_dir, tmp=tmp_path, llm=llm) if isinstance(value, str) else value
            for key, value in values.items()}
