"""Where everything of a drawn graph goes, computed once for the HTML viewer and `adag figure` alike.

The per-prompt layout puts token positions across and layers up: embedding nodes in the bottom row,
the target logits in the top row, the neurons of one (layer, position) cell side by side, each
column as wide as its busiest cell, and every token's text under its column. The cluster layout puts
clusters at their mean layer, spread sideways so that no circle or label touches another. Units are
CSS pixels in the viewer and points in figures; labels use a monospace font whose advance is
`CHAR`, and the viewer stretches each label to its computed width, so boxes computed here are the
boxes drawn.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from adag.report.graph import PromptGraph

FONT = 11.0
CHAR = 0.6 * FONT  # advance of one monospace glyph
TEXT_HEIGHT = 1.5 * FONT  # a line's box with room for ascenders and descenders
GAP = 2.0  # between any two boxes
ROW = 18.0  # one layer
R_MIN, R_MAX = 2.5, 7.0  # node radii in the prompt graph
SUPERNODE_R_MIN, SUPERNODE_R_MAX = 4.0, 11.0
SLOT = 2 * R_MAX + 3  # one node's share of a cell
LINE = 1.2 * FONT  # the glyph box of one line of monospace text
COLUMN_MIN = max(LINE, 2 * R_MAX) + GAP  # a column with one embedding node and a vertical token label
TOKEN_CHARS = 14  # token labels are cut to this length (the full text is a tooltip)
LABEL_CHARS = 22  # supernode labels likewise
CLUSTER_LABEL_CHARS = 32  # labels in the cluster graph, which has more room
LEFT, RIGHT, TOP = 64.0, 16.0, 30.0
BOTTOM = TOKEN_CHARS * CHAR + 2 * R_MAX
CLUSTER_R_MIN, CLUSTER_R_MAX = 4.0, 13.0
MAX_ROW = 4 * CLUSTER_R_MAX  # a layer of the cluster graph grows up to this height before the graph widens
WHITESPACE = {" ": "\u2423", "\n": "\u21b5", "\t": "\u21e5"}  # glyphs every DejaVu Sans Mono has


def visible(text: str, limit: int) -> str:
    """`text` with whitespace and control characters made visible, cut to `limit` characters."""
    shown = "".join(WHITESPACE.get(ch, f"\\x{ord(ch):02x}" if ord(ch) < 32 or ord(ch) == 127 else ch)
                    for ch in text)
    return shown if len(shown) <= limit else shown[:limit - 1] + "\u2026"


def shortened(text: str, limit: int) -> str:
    """A label on one line (whitespace runs become one space), cut to `limit` characters."""
    single = " ".join(text.split())
    return single if len(single) <= limit else single[:limit - 1] + "\u2026"


def text_width(text: str) -> float:
    return len(text) * CHAR


@dataclass
class Label:
    """A text box: `x, y` is the anchor, `anchor` is start, middle or end along the text, and
    `vertical` labels read bottom to top. `full` is the uncut text, for tooltips; `node` is the node
    the label belongs to (hidden with it), -1 for none."""

    x: float
    y: float
    text: str
    full: str
    anchor: str = "start"
    vertical: bool = False
    kind: str = "token"
    node: int = -1
    length: float = 0.0

    def __post_init__(self) -> None:
        self.length = text_width(self.text)


@dataclass
class Layout:
    """Coordinates of every node (in the graph's node order), the labels and the y axis ticks."""

    width: float
    height: float
    x: np.ndarray
    y: np.ndarray
    r: np.ndarray
    labels: list[Label] = field(default_factory=list)
    ticks: list[tuple[float, str]] = field(default_factory=list)
    grid: Grid | None = None  # of a prompt layout

    def to_json(self) -> dict:
        return {"width": round(self.width, 1), "height": round(self.height, 1),
                "x": np.round(self.x, 1).tolist(), "y": np.round(self.y, 1).tolist(),
                "r": np.round(self.r, 2).tolist(),
                "labels": [{**asdict(label), "x": round(label.x, 1), "y": round(label.y, 1),
                            "length": round(label.length, 1)} for label in self.labels],
                "ticks": [[round(y, 1), text] for y, text in self.ticks]}


def _radii(strength: np.ndarray, low: float, high: float) -> np.ndarray:
    """Area proportional to strength, between `low` and `high`."""
    top = strength.max(initial=0.0)
    return low + (high - low) * np.sqrt(strength / top) if top > 0 else np.full(len(strength), low)


@dataclass
class Grid:
    """The frame of a prompt layout: token column edges (left to right) and the centre of each row
    from the bottom: embeddings, layers 0 .. L-1, logits. A layer whose busiest cell does not fit
    side by side in its column is taller, with its nodes in several sub-rows."""

    columns: np.ndarray
    rows: np.ndarray
    per_row: np.ndarray  # nodes side by side in one sub-row of each column

    def y(self, layer: np.ndarray | float) -> np.ndarray:
        """Row centre of a (possibly fractional) layer; -1 is the embeddings, L the logits."""
        return np.interp(np.asarray(layer, dtype=float) + 1, np.arange(len(self.rows)), self.rows)


def _grid(graph: PromptGraph, min_width: float) -> Grid:
    """Columns as wide as their busiest cell; if that is wider than `min_width` in all, the busiest
    columns are narrowed to the widest common number of nodes per sub-row that fits, and the layers
    that need it get more sub-rows. Spare width goes to the columns that hold neurons."""
    nodes = graph.nodes
    kinds = nodes["kind"].to_numpy()
    position = nodes["position"].to_numpy(int)
    neurons = kinds == "neuron"
    n_positions, n_layers = len(graph.tokens), graph.n_layers
    counts = np.zeros((n_positions, n_layers), dtype=int)
    np.add.at(counts, (position[neurons], nodes["layer"].to_numpy(int)[neurons]), 1)
    busiest = np.maximum(counts.max(1, initial=0), 1)
    widened = counts.any(1) if neurons.any() else np.ones(n_positions, bool)
    occupied = np.zeros(n_positions, bool)
    occupied[position[kinds != "logit"]] = True
    budget = min_width - LEFT - RIGHT - COLUMN_MIN * (~occupied).sum()

    def widths(cap: int) -> np.ndarray:
        return np.where(occupied, np.maximum(COLUMN_MIN, np.minimum(busiest, cap) * SLOT + GAP), COLUMN_MIN)

    cap = int(busiest.max())
    while cap > 1 and widths(cap)[occupied].sum() > budget:
        cap -= 1
    need = widths(cap)
    extra = max(0.0, min_width - LEFT - RIGHT - need.sum())
    need = need + extra * np.where(widened, need, 0) / need[widened].sum() if widened.any() else need
    per_row = np.minimum(busiest, cap)
    sub_rows = np.maximum(np.ceil(counts / per_row[:, None]).max(0, initial=1), 1) if n_positions else np.ones(n_layers)
    heights = np.r_[ROW, ROW + (sub_rows - 1) * SLOT, ROW]  # bottom to top
    rows = TOP + heights.sum() - (np.cumsum(heights) - heights / 2)
    return Grid(LEFT + np.r_[0.0, np.cumsum(need)], rows, per_row)


def prompt_layout(graph: PromptGraph, min_width: float = 1200.0, grid: Grid | None = None) -> Layout:
    """Lay out a prompt's graph. A neuron graph gets its own grid; pass it to lay out the graph's
    supernode version on the same token columns and rows."""
    nodes = graph.nodes
    kinds = nodes["kind"].to_numpy()
    position = nodes["position"].to_numpy(int)
    layer = nodes["layer"].to_numpy(float)
    strength = nodes["attribution"].abs().to_numpy()
    r = np.full(len(nodes), R_MAX)
    for kind, (low, high) in {"embedding": (R_MIN, R_MAX), "neuron": (R_MIN, R_MAX),
                              "supernode": (SUPERNODE_R_MIN, SUPERNODE_R_MAX)}.items():
        pool = kinds == kind
        r[pool] = _radii(strength[pool], low, high)

    grid = grid or _grid(graph, min_width)
    center = (grid.columns[:-1] + grid.columns[1:]) / 2
    column_width = np.diff(grid.columns)
    x = center[position].astype(float)
    y = grid.y(layer)
    # side by side within a (layer, position) cell, grouped by cluster, in sub-rows if crowded
    order = np.lexsort([nodes["neuron"].to_numpy(), nodes["cluster"].to_numpy(), layer, position])
    order = order[kinds[order] == "neuron"]
    if len(order):
        cell = position[order] * (graph.n_layers + 1) + layer[order].astype(int)
        starts = np.flatnonzero(np.r_[True, cell[1:] != cell[:-1]])
        sizes = np.diff(np.r_[starts, len(order)])
        rank = np.arange(len(order)) - np.repeat(starts, sizes)
        size = np.repeat(sizes, sizes)
        per_row = grid.per_row[position[order]]
        sub_row, place = rank // per_row, rank % per_row
        in_row = np.minimum(per_row, size - sub_row * per_row)
        spacing = np.minimum(column_width[position[order]] / np.minimum(size, per_row), 2.5 * SLOT)
        x[order] += (place - (in_row - 1) / 2) * spacing
        y[order] += (sub_row - (np.ceil(size / per_row) - 1) / 2) * SLOT

    bottom = float(grid.rows[0])
    labels = [Label(float(center[p]), bottom + R_MAX + GAP, visible(token, TOKEN_CHARS), token, anchor="end",
                    vertical=True) for p, token in enumerate(graph.tokens)]
    width = float(grid.columns[-1] + RIGHT)
    x, y, labels, width = _place_logits(nodes, x, y, labels, width, center)
    if (kinds == "supernode").any():
        x, y, width, supernode_labels = _place_supernodes(nodes, x, y, r, width)
        labels += supernode_labels
    ticks = [(float(grid.rows[-1]), "logits"), (bottom, "emb")]
    ticks += [(float(grid.rows[ell + 1]), str(ell)) for ell in range(graph.n_layers)]
    return Layout(width, bottom + R_MAX + GAP + BOTTOM, x, y, r, labels, ticks, grid)


def _place_logits(nodes, x, y, labels, width, center):
    """Logits in the top row, centred over the last position, each with its token and probability above (the
    expected answer's marked with a tick)."""
    logits = np.flatnonzero(nodes["kind"].to_numpy() == "logit")
    if not len(logits):
        return x, y, labels, width
    correct = nodes["correct"].to_numpy() if "correct" in nodes else np.zeros(len(nodes), bool)
    texts = [("\u2713" if correct[i] else "") + visible(str(nodes["token"].iat[i]), TOKEN_CHARS)
             + f" {nodes['probability'].iat[i]:.0%}" for i in logits]
    fulls = [f"{nodes['token'].iat[i]!r} p={nodes['probability'].iat[i]:.3f}" + (" (the expected answer)" if correct[i]
                                                                                  else "") for i in logits]
    spacing = max(SLOT, max(text_width(t) for t in texts) + 3 * GAP)
    span = spacing * (len(logits) - 1)
    start = min(max(center[-1] - span / 2, LEFT + spacing / 2), max(LEFT, width - RIGHT - spacing / 2 - span))
    x[logits] = start + spacing * np.arange(len(logits))
    width = max(width, float(x[logits].max() + spacing / 2 + RIGHT))
    labels = labels + [Label(float(x[i]), float(y[i] - R_MAX - GAP - FONT / 2), text, full, anchor="middle",
                             kind="logit", node=int(i)) for i, text, full in zip(logits, texts, fulls)]
    return x, y, labels, width


def _place_supernodes(nodes, x, y, r, width):
    """Supernodes (and neurons left out of every cluster) at their mean layer and dominant position,
    moved sideways, or a little up or down, until neither circle nor label touches another."""
    kinds = nodes["kind"].to_numpy()
    movable = np.flatnonzero(np.isin(kinds, ("supernode", "neuron")))
    movable = movable[np.argsort(-nodes["attribution"].abs().to_numpy()[movable], kind="stable")]
    texts = {i: nodes["label"].iat[i] for i in movable if kinds[i] == "supernode"}
    cut = {i: shortened(text, LABEL_CHARS) for i, text in texts.items()}
    obstacles = [_box(x[i], y[i], r[i], 0.0) for i in np.flatnonzero(~np.isin(kinds, ("supernode", "neuron")))]
    placer = _Placer(LEFT, width - RIGHT, obstacles)
    x, y = x.copy(), y.copy()
    labels = []
    for i in movable:
        lw = text_width(cut[i]) if i in cut else 0.0
        x[i], y[i] = placer.place(x[i], y[i], r[i], lw, dys=(0.0, 0.3 * ROW, -0.3 * ROW))
        if i in cut:
            labels.append(Label(float(x[i] + r[i] + GAP), float(y[i]), cut[i], texts[i], kind="cluster", node=int(i)))
    return x, y, max(width, placer.right + RIGHT), labels


def _box(x: float, y: float, r: float, label_width: float) -> np.ndarray:
    """A circle of radius r at (x, y) with an optional label to its right, as (x0, y0, x1, y1)."""
    half = max(r, TEXT_HEIGHT / 2) if label_width else r
    return np.array([x - r, y - half, x + r + (GAP + label_width if label_width else 0.0), y + half])


class _Placer:
    """Greedy placement of boxes: each goes to the free spot nearest to where it wants to be."""

    def __init__(self, left: float, right: float, obstacles: list[np.ndarray], step: float = 4.0):
        self.left, self.right_bound, self.step = left, right, step
        self.boxes = np.array(obstacles).reshape(-1, 4)
        self.right = self.boxes[:, 2].max(initial=left)

    def place(self, x: float, y: float, r: float, label_width: float, dys: tuple[float, ...],
              xs: np.ndarray | None = None) -> tuple[float, float]:
        """Place a node at or near (x, y), trying the x positions `xs` (default: every `step`)."""
        box = _box(0.0, 0.0, r, label_width)
        low, high = self.left - box[0], self.right_bound - box[2]
        if high >= low:
            xs = np.r_[np.arange(low, high, self.step), high] if xs is None else xs[(xs >= low) & (xs <= high)]
            candidates = np.array([(cx, y + dy) for dy in dys for cx in xs])
            cost = np.abs(candidates[:, 0] - x) + 4 * np.abs(candidates[:, 1] - y)
            candidates = candidates[np.argsort(cost, kind="stable")]
            free = self._free(candidates, box)
            if free.any():
                return self._take(*candidates[np.argmax(free)], box)
        return self._take(max(self.right + GAP, self.right_bound) - box[0], y, box)

    def _free(self, candidates: np.ndarray, box: np.ndarray) -> np.ndarray:
        if not len(self.boxes):
            return np.ones(len(candidates), bool)
        shifted = box[None, :] + np.c_[candidates, candidates]  # (C, 4)
        a, b = shifted[:, None, :], self.boxes[None, :, :]
        gap = 2 * GAP
        apart = ((a[..., 2] + gap <= b[..., 0]) | (b[..., 2] + gap <= a[..., 0])
                 | (a[..., 3] + gap <= b[..., 1]) | (b[..., 3] + gap <= a[..., 1]))
        return apart.all(1)

    def _take(self, x: float, y: float, box: np.ndarray) -> tuple[float, float]:
        placed = box + np.array([x, y, x, y])
        self.boxes = np.vstack([self.boxes, placed])
        self.right = max(self.right, placed[2])
        return float(x), float(y)


def cluster_layout(mean_layer: np.ndarray, strength: np.ndarray, labels: list[str], width: float = 760.0) -> Layout:
    """Clusters at their mean layer on a y axis, spread across so that no circle or label touches
    another (a label goes to the right of its circle). Space for the largest circle is kept around
    every node, so circles may be redrawn at other sizes (another prompt's attributions) in place."""
    mean_layer = np.asarray(mean_layer, float)
    cut = [shortened(text, CLUSTER_LABEL_CHARS) for text in labels]
    r = _radii(np.abs(np.asarray(strength, float)), CLUSTER_R_MIN, CLUSTER_R_MAX)
    low = np.floor(mean_layer.min()) if len(mean_layer) else 0.0
    high = max(np.ceil(mean_layer.max()) if len(mean_layer) else 0.0, low + 1)
    row = 2 * CLUSTER_R_MAX + 2 * GAP
    order = np.argsort(-np.abs(np.asarray(strength, float)), kind="stable")
    by_layer = np.argsort(np.argsort(mean_layer, kind="stable"), kind="stable")
    slot = 2 * CLUSTER_R_MAX + 2 * GAP + max((text_width(text) for text in cut), default=0.0)
    for _ in range(40):  # too crowded: taller layers (up to MAX_ROW), then one more slot across
        top = TOP / 2 + CLUSTER_R_MAX
        y = top + (high - mean_layer) * row
        slots = LEFT + CLUSTER_R_MAX + slot * np.arange(max(1, int((width - LEFT - RIGHT) // slot)))
        wanted = slots[((by_layer * 0.618034) % 1.0 * len(slots)).astype(int)]
        placer = _Placer(LEFT, width - RIGHT, [])
        x = np.zeros(len(mean_layer))
        for i in order:
            x[i], y[i] = placer.place(wanted[i], y[i], CLUSTER_R_MAX, text_width(cut[i]), xs=slots,
                                      dys=tuple(row * np.array([0.0, 0.15, -0.15, 0.3, -0.3, 0.45, -0.45])))
        if placer.right <= width - RIGHT:
            break
        if row < MAX_ROW:
            row = min(row * 1.2, MAX_ROW)
        else:
            width += slot
    width = max(width, placer.right + RIGHT)
    height = top + (high - low) * row + CLUSTER_R_MAX + TOP / 2
    step = max(1, int(np.ceil(TEXT_HEIGHT / row)))
    ticks = [(float(top + (high - ell) * row), str(int(ell))) for ell in np.arange(low, high + 1, step)]
    text_labels = [Label(float(x[i] + CLUSTER_R_MAX + GAP), float(y[i]), cut[i], labels[i], kind="cluster",
                         node=i) for i in range(len(labels))]
    return Layout(float(width), float(height), x, y, r, text_labels, ticks)
