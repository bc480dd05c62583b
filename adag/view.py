"""A typed, cached, read-only view of a run's finished results, shared by every stage that reads.

Each table is read once and each join is made once: nodes come with their half-neuron polarity
and (once clustered) their cluster; edges and nodes are grouped by prompt once, so per-prompt work
is a lookup, not a filter over the whole table. `prompt_input_sums` is the one per-prompt aggregation of
input profiles that clustering, descriptions and the report share, with one rule for position 0.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from adag.errors import AdagError
from adag.half_neurons import HalfNeuron, node_clusters, polarity
from adag.store import RunDir

PROFILE_COLUMNS = ["input_profile", "output_profile"]


def first_counted_position(keep_first_position: bool) -> int:
    """The first token position whose input contributions count (DESIGN.md section 7): position 0, an attention
    sink that takes a large, uninformative share, counts only when the trace could keep nodes there (the trace's
    `keep_first_position`)."""
    return 0 if keep_first_position else 1


@dataclass
class PromptSums:
    """The summed input contributions of some (unit, prompt) pairs whose prompts have one length."""

    nodes: np.ndarray  # for each pair, the row (in the nodes table) of its first node
    values: np.ndarray  # (pairs, counted positions): column j is token position first + j
    first: int


def prompt_input_sums(nodes: pd.DataFrame, unit: np.ndarray, keep_first_position: bool,
                      weighted: bool = True) -> Iterator[PromptSums]:
    """Each (unit, prompt) pair's input profiles summed over its nodes per token position, one block per prompt
    length (pairs in order of unit, then prompt; a pair's nodes summed in table order, in float64). `unit` is each
    node's half-neuron or cluster. Weighted: raw contributions (the stored share times the activation, so that a
    near-silent neuron with a huge share counts for little), else the stored shares. Positions before
    `first_counted_position` are left out."""
    first = first_counted_position(keep_first_position)
    prompt = nodes["prompt"].to_numpy()
    profiles = nodes["input_profile"].to_numpy()
    activation = nodes["activation"].to_numpy().astype(np.float64)
    lengths = np.fromiter((len(p) for p in profiles), dtype=np.int64, count=len(profiles))
    by_length = np.argsort(lengths, kind="stable")
    for members in np.split(by_length, np.flatnonzero(np.diff(lengths[by_length])) + 1):
        if not len(members):
            continue
        order = members[np.lexsort((prompt[members], unit[members]))]
        pair_unit, pair_prompt = unit[order], prompt[order]
        starts = np.flatnonzero(np.r_[True, (pair_unit[1:] != pair_unit[:-1]) | (pair_prompt[1:] != pair_prompt[:-1])])
        block = np.stack(profiles[order]).astype(np.float64)[:, first:]
        if weighted:
            block *= activation[order, None]
        yield PromptSums(order[starts], np.add.reduceat(block, starts, axis=0), first)


def prompt_input_vectors(nodes: pd.DataFrame, unit: np.ndarray,
                         keep_first_position: bool) -> dict[tuple[int, int], np.ndarray]:
    """`prompt_input_sums` (weighted) as {(unit, prompt): one value per token of the prompt}, positions that do
    not count set to 0."""
    prompt = nodes["prompt"].to_numpy()
    vectors = {}
    for sums in prompt_input_sums(nodes, unit, keep_first_position):
        padded = np.concatenate([np.zeros((len(sums.nodes), sums.first)), sums.values], axis=1)
        for row, values in zip(sums.nodes, padded):
            vectors[int(unit[row]), int(prompt[row])] = values
    return vectors


class RunView:
    """Read access to a run. Tables are cached on first use; a stage's results are visible only when
    the stage is done and not stale (`has`)."""

    def __init__(self, run: RunDir):
        self.run = run

    @classmethod
    def open(cls, path: str | Path) -> RunView:
        return cls(RunDir.open(path))

    @property
    def path(self) -> Path:
        return self.run.path

    @property
    def model(self) -> dict[str, Any]:
        return self.run.manifest["model"]

    @property
    def dataset(self) -> dict[str, Any]:
        return self.run.manifest["dataset"]

    def has(self, stage: str, table: str | None = None) -> bool:
        """Whether `stage` is finished and current (and, if given, wrote `table`)."""
        return self.run.stage_done(stage) and (table is None or self.run.has_table(stage, table))

    def require(self, stage: str) -> None:
        self.run.require_stage(stage, self.run.command(stage))

    def config(self, stage: str) -> dict[str, Any]:
        self.require(stage)
        return self.run.stage_config(stage)

    def table(self, stage: str, name: str, columns: list[str] | None = None) -> pd.DataFrame | None:
        """A finished stage's table, or None if the stage (or the table) is absent or stale."""
        return self.run.read_table(stage, name, columns) if self.has(stage, name) else None

    def file(self, stage: str, file: str) -> bytes | None:
        """A file a finished, current stage recorded in the manifest (e.g. "plots/overview.png"), or None."""
        return self.run.read_bytes(stage, file) if self.has(stage) and self.run.has_file(stage, file) else None

    # trace

    @cached_property
    def prompts(self) -> pd.DataFrame:
        self.require("trace")
        return self.run.read_table("trace", "prompts")

    @cached_property
    def prompt_text(self) -> dict[int, str]:
        return dict(zip(self.prompts["prompt"].tolist(), self.prompts["text"]))

    @cached_property
    def nodes(self) -> pd.DataFrame:
        """Every traced node with its profiles, plus `polarity` and, once clustered, `cluster`."""
        self.require("trace")
        return self._with_keys(self.run.read_table("trace", "nodes"))

    @cached_property
    def node_keys(self) -> pd.DataFrame:
        """The nodes without their profile columns (cheap to read), row-aligned with `nodes`."""
        if "nodes" in self.__dict__:
            return self.nodes.drop(columns=PROFILE_COLUMNS)
        self.require("trace")
        columns = ["prompt", "node", "layer", "position", "neuron", "activation", "attribution"]
        return self._with_keys(self.run.read_table("trace", "nodes", columns))

    def _with_keys(self, nodes: pd.DataFrame) -> pd.DataFrame:
        nodes = nodes.assign(polarity=polarity(nodes["activation"]))
        if self.has("cluster"):
            nodes["cluster"] = node_clusters(nodes, self.half_neurons)
        return nodes

    @cached_property
    def edges(self) -> pd.DataFrame | None:
        """The traced edges (None when traced without the edge pass)."""
        self.require("trace")
        return self.table("trace", "edges")

    @cached_property
    def edges_by_prompt(self) -> dict[int, pd.DataFrame]:
        if self.edges is None:
            return {}
        return {int(prompt): group for prompt, group in self.edges.groupby("prompt", sort=True)}

    @cached_property
    def embeddings(self) -> pd.DataFrame:
        """The kept embedding nodes: prompt, position, token_id, token, relevance."""
        self.require("trace")
        return self.run.read_table("trace", "embeddings")

    @cached_property
    def embeddings_by_prompt(self) -> dict[int, pd.DataFrame]:
        """`embeddings` grouped by prompt (every traced prompt has an entry, possibly empty)."""
        groups = {int(prompt): group for prompt, group in self.embeddings.groupby("prompt", sort=True)}
        empty = self.embeddings.iloc[:0]
        return {int(prompt): groups.get(int(prompt), empty) for prompt in self.prompts["prompt"]}

    @cached_property
    def nodes_by_prompt(self) -> dict[int, pd.DataFrame]:
        """`node_keys` grouped by prompt (every traced prompt has an entry, possibly empty)."""
        groups = {int(prompt): group for prompt, group in self.node_keys.groupby("prompt", sort=True)}
        empty = self.node_keys.iloc[:0]
        return {int(prompt): groups.get(int(prompt), empty) for prompt in self.prompts["prompt"]}

    # cluster

    @cached_property
    def half_neurons(self) -> pd.DataFrame:
        self.require("cluster")
        return self.run.read_table("cluster", "half_neurons")

    @cached_property
    def clusters(self) -> pd.DataFrame:
        self.require("cluster")
        return self.run.read_table("cluster", "clusters")

    @cached_property
    def node_cluster(self) -> np.ndarray:
        """The cluster of each node (row-aligned with `nodes`; -1 for an unclustered half-neuron)."""
        self.require("cluster")
        return self.node_keys["cluster"].to_numpy()

    @cached_property
    def cluster_members(self) -> dict[int, list[HalfNeuron]]:
        return {int(c): list(zip(g["layer"].tolist(), g["neuron"].tolist(), g["polarity"].tolist()))
                for c, g in self.half_neurons.groupby("cluster")}

    def check_clusters(self, clusters: list[int]) -> None:
        unknown = sorted(set(clusters) - set(self.cluster_members))
        if unknown:
            raise AdagError(f"no cluster {unknown} in {self.path}; clusters are 0..{max(self.cluster_members)}")

    # describe

    @cached_property
    def labels(self) -> dict[int, str]:
        """Each described cluster's label ('cluster N' where none)."""
        labels = {int(c): f"cluster {int(c)}" for c in self.clusters["cluster"]} if self.has("cluster") else {}
        described = self.table("describe", "descriptions")
        if described is not None:
            labels.update({int(c): label for c, label in zip(described["cluster"], described["label"]) if label})
        return labels
