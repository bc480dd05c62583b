"""A stage run on some clusters (describe --clusters, steer --clusters or --top, judge --cluster) adds them
to the stage's finished result instead of replacing it: finished work (paid LLM calls, model time) is never
lost to a partial rerun.

The finished result is kept when it was made with the same settings (other than which clusters) from the
same inputs; the new run then computes only the clusters it lacks and records the union. A result made
with other settings that holds clusters the new run would not redo is refused, with the way to keep it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import BaseModel

from adag.errors import AdagError
from adag.pipeline import Stage, stage_inputs

if TYPE_CHECKING:
    from adag.store import RunDir


def kept_clusters(run: RunDir, stage: Stage, config: BaseModel, record: BaseModel, subset: set[str], chosen: set[int],
                  held: set[int], how: str) -> set[int]:
    """The clusters of `stage`'s finished result (which holds `held`) to keep when it runs on `chosen`
    with `config`. `subset` names the settings that choose clusters; `record` is the config the merged
    result would be recorded with; `how` completes the refusal (how else to drop the old results)."""
    if not held or not run.stage_done(stage.name):
        return set()
    entry = run.entry(stage.name)
    given = config.model_dump(mode="json")
    changed = [name for name in given if name not in subset and entry["config"].get(name) != given[name]]
    if not changed and entry["inputs"] == stage_inputs(run, stage, record):
        return held
    lost = sorted(held - chosen)
    if lost:
        names = ", ".join("--" + name.replace("_", "-") for name in changed) or "its inputs"
        raise AdagError(f"{run.path} holds finished '{stage.name}' results for clusters {lost} made with other "
                        f"settings ({names}), which this run would drop; keep them by giving the recorded settings "
                        f"(`{run.command(stage.name)}`) with the clusters to add, or {how}")
    return set()
