"""The registry: every command of the pipeline, in pipeline order, as its package declares it (a
`Stage` in the package's config.py). The CLI builds one command per entry (options from the pydantic
models); a study runs the entries that write into the run. Kept light (pydantic only) so that
`adag --help` starts fast; stage functions are imported when they run."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import ValidationError

from adag.cluster.config import CLUSTER_STAGE
from adag.describe.config import DESCRIBE_STAGE
from adag.pipeline import Stage, option_name
from adag.report.config import EXPORT_STAGE, FIGURE_STAGE, REPORT_STAGE
from adag.steer.config import CORRELATE_STAGE, FAITHFULNESS_STAGE, JUDGE_STAGE, MEASURE_STAGE, STEER_STAGE
from adag.trace.config import TRACE_STAGE

STAGES: dict[str, Stage] = {stage.name: stage for stage in (
    TRACE_STAGE, CLUSTER_STAGE, DESCRIBE_STAGE, MEASURE_STAGE, CORRELATE_STAGE, STEER_STAGE, FAITHFULNESS_STAGE,
    JUDGE_STAGE, REPORT_STAGE, EXPORT_STAGE, FIGURE_STAGE)}
STEPS = [name for name, stage in STAGES.items() if stage.writes]  # the stages that write into the run


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
