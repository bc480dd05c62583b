"""The README's first walk-through runs as written: every `adag` line of its code block, on the tiny
Llama saved as a model directory (in place of the built-in model) and 3 prompts (in place of its limit),
so that a renamed command or option fails here rather than in a newcomer's terminal."""

import re
import shlex
from pathlib import Path

from adag.store import RunDir
from tests.test_cli import adag

README = Path(__file__).parents[1] / "README.md"


def walk_through() -> list[list[str]]:
    """The commands of the code block under "## A first walk-through"."""
    section = README.read_text(encoding="utf-8").split("## A first walk-through", 1)[1]
    block = re.search(r"```\n(.*?)```", section, re.S).group(1)
    return [shlex.split(line.split("#")[0]) for line in block.splitlines() if line.startswith("adag ")]


def test_the_readme_is_short_and_links_the_docs():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 250
    linked = set(re.findall(r"\(docs/([\w-]+\.md)", text))
    pages = {path.name for path in (README.parent / "docs").glob("*.md")}
    assert pages and pages <= linked, f"pages not linked from README: {pages - linked}"
    assert "make demo" in text and "make test" in text


def test_the_first_walk_through_runs(model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("ADAG_CACHE", str(tmp_path / "cache"))
    commands = walk_through()
    assert [words[1] for words in commands][:4] == ["models", "datasets", "trace", "cluster"]
    for words in commands:
        adag(*[str(model_dir) if previous == "--model" else "3" if previous == "--limit"
               else str(tmp_path / word) if word.startswith("runs/") else word
               for previous, word in zip(words, words[1:])])
    out = next(word for words in commands for previous, word in zip(words, words[1:]) if previous == "--out")
    run = RunDir.open(tmp_path / out)
    assert all(run.stage_done(stage) for stage in ("trace", "cluster", "describe", "steer", "report"))
