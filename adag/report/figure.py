"""Static pictures for papers: a prompt's attribution graph or the dataset cluster graph, drawn with
matplotlib from the same layout as the viewer (one layout unit is one point)."""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Circle, PathPatch
from matplotlib.path import Path as CurvePath

from adag.outputs import output_file, write
from adag.pipeline import StageResult, Summary
from adag.report.config import DEFAULT_MIN_WEIGHT, DEFAULT_SHARE, FIGURE_FORMATS, FigureConfig
from adag.report.data import cluster_color, dataset_cluster_layout, graph_of
from adag.report.graph import PromptGraph, collapse_clusters, pruning_order
from adag.report.layout import FONT, LEFT, Label, Layout, prompt_layout
from adag.report.palette import NEGATIVE, POSITIVE
from adag.store import RunDir
from adag.view import RunView

GREY, LIGHT = "#9aa3ad", "#ccccdd"


def _sign(value: float) -> str:
    return POSITIVE if value >= 0 else NEGATIVE


def _canvas(layout: Layout) -> tuple[Figure, object]:
    figure = Figure(figsize=(layout.width / 72, layout.height / 72))
    axes = figure.add_axes((0, 0, 1, 1))
    axes.set_xlim(0, layout.width)
    axes.set_ylim(layout.height, 0)
    axes.set_axis_off()
    return figure, axes


def _curve(axes, x1: float, y1: float, x2: float, y2: float, **style) -> None:
    middle = (y1 + y2) / 2
    bow = abs(y1 - y2) * 0.25 if abs(x1 - x2) < 1 else 0.0
    path = CurvePath([(x1, y1), (x1 + bow, middle), (x2 + bow, middle), (x2, y2)],
                     [CurvePath.MOVETO, CurvePath.CURVE4, CurvePath.CURVE4, CurvePath.CURVE4])
    axes.add_patch(PathPatch(path, fill=False, capstyle="round", **style))


def _axis(axes, layout: Layout) -> None:
    for y, text in layout.ticks:
        axes.plot([LEFT - 8, layout.width - 8], [y, y], color="#eeeeee", linewidth=0.6, zorder=0)
        axes.text(LEFT - 14, y, text, ha="right", va="center", fontsize=FONT, family="monospace", color="#666666")
    ys = [y for y, _ in layout.ticks]
    axes.text(12, (min(ys) + max(ys)) / 2, "layer", rotation=90, ha="center", va="center", fontsize=FONT,
              family="monospace", color="#444444")


def _label(axes, label: Label) -> None:
    if label.vertical:  # reads bottom to top, hanging below its anchor
        axes.text(label.x, label.y, label.text, rotation=90, ha="center", va="top", fontsize=FONT,
                  family="monospace", color="#333333")
    else:
        axes.text(label.x, label.y, label.text, ha={"start": "left", "middle": "center", "end": "right"}[label.anchor],
                  va="center", fontsize=FONT, family="monospace", color="#222222")


def prompt_figure(graph: PromptGraph, colors: dict[int, str], supernodes: bool = False,
                  share: float = DEFAULT_SHARE, min_weight: float = DEFAULT_MIN_WEIGHT,
                  color_by: str = "sign") -> Figure:
    """A prompt's attribution graph pruned to the nodes carrying `share` of the attribution."""
    layout = prompt_layout(graph)
    if supernodes:
        graph = collapse_clusters(graph)
        layout = prompt_layout(graph, grid=layout.grid)
    nodes, edges = graph.nodes, graph.edges
    shown = (pruning_order(graph) < share) | (share >= 1)
    figure, axes = _canvas(layout)
    _axis(axes, layout)
    weights = edges["weight"].abs().to_numpy()
    top = max(weights.max(initial=0.0), 1e-12)
    for e in np.argsort(weights, kind="stable"):
        s, t = int(edges["source"].iat[e]), int(edges["target"].iat[e])
        if shown[s] and shown[t] and weights[e] >= min_weight:
            _curve(axes, layout.x[s], layout.y[s], layout.x[t], layout.y[t], edgecolor=_sign(edges["weight"].iat[e]),
                   alpha=0.45, linewidth=0.3 + 2.7 * weights[e] / top, zorder=1)
    kinds, clusters = nodes["kind"].to_numpy(), nodes["cluster"].to_numpy()
    if color_by == "cluster":
        drawn = sorted({int(c) for c in clusters[shown & (clusters >= 0)]})
        labels = dict(zip(nodes["cluster"], nodes["label"]))
        axes.legend(handles=[Line2D([], [], marker="o", linestyle="", color=colors.get(c, LIGHT),
                                    label=f"{c}: {labels[c]}") for c in drawn],
                    loc="upper left", bbox_to_anchor=(LEFT / layout.width, 1.0), frameon=False, fontsize=FONT)
    for i in np.flatnonzero(shown):
        if kinds[i] == "logit":
            fill = GREY
        elif color_by == "cluster":
            fill = colors.get(int(clusters[i]), LIGHT) if kinds[i] in ("neuron", "supernode") else LIGHT
        else:
            fill = _sign(nodes["attribution"].iat[i])
        axes.add_patch(Circle((layout.x[i], layout.y[i]), layout.r[i], facecolor=fill, edgecolor="white",
                              linewidth=0.6, zorder=2))
    for label in layout.labels:
        if label.node < 0 or shown[label.node]:
            _label(axes, label)
    return figure


def cluster_figure(view: RunView) -> Figure:
    """The dataset cluster graph: clusters at their mean layer, sized by mean attribution."""
    layout = dataset_cluster_layout(view)
    figure, axes = _canvas(layout)
    _axis(axes, layout)
    where = {int(c): i for i, c in enumerate(view.clusters["cluster"])}
    edges = view.table("cluster", "mean_cluster_edges")
    if edges is not None and len(edges):
        top = max(edges["attribution"].abs().max(), 1e-12)
        for row in edges.itertuples():
            i, j = where.get(int(row.source_cluster)), where.get(int(row.target_cluster))
            if i is not None and j is not None:
                _curve(axes, layout.x[i], layout.y[i], layout.x[j], layout.y[j], edgecolor=_sign(row.attribution),
                       alpha=0.5, linewidth=0.5 + 5 * abs(row.attribution) / top, zorder=1)
    mean = view.table("cluster", "mean_clusters").set_index("cluster")["attribution"]
    for i, c in enumerate(view.clusters["cluster"]):
        value = float(mean.get(c, 0.0))
        axes.add_patch(Circle((layout.x[i], layout.y[i]), layout.r[i], facecolor="#8cb8f0" if value >= 0 else "#f0a08c",
                              edgecolor="#445566", zorder=2))
    for label in layout.labels:
        _label(axes, label)
    return figure


def write_figure(run_dir: str | Path, out: str | Path, config: FigureConfig) -> Path:
    """Draw the figure `config` asks for into `out` (.svg, .png or .pdf)."""
    path = output_file(out, FIGURE_FORMATS)
    view = RunView.open(run_dir)
    if config.clusters or config.supernodes or config.color_by == "cluster":
        view.require("cluster")
    if config.clusters:
        figure = cluster_figure(view)
    else:
        colors = {c: cluster_color(c) for c in view.labels}
        figure = prompt_figure(graph_of(view, config.prompt), colors, config.supernodes, config.share,
                               config.min_weight, config.color_by)
    buffer = BytesIO()
    figure.savefig(buffer, format=path.suffix.lower().lstrip("."), dpi=200)
    return write(path, buffer.getvalue(), FIGURE_FORMATS)


def figure_run(run_dir: str, config: FigureConfig, out: str) -> StageResult:
    """`adag figure`."""
    return StageResult(RunDir.open(run_dir), file=write_figure(run_dir, out, config))


def figure_summary(result: StageResult) -> Summary:
    return Summary(f"figure written to {result.file}")
