"""The viewer inline in a Jupyter notebook: `adag.show(run, prompt=..., cluster=...)`.

Without a server the cell holds a self-contained page (the report's, opened at the chosen prompt and
cluster) in a sandboxed frame; given a served viewer (`adag serve`, or `serve_in_background(run,
embeddable=True)`), the frame shows that viewer, which can also steer. The returned object says in Python
what was shown and reads the prompt's graph with the keys the page uses (`window.adag`).
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlencode

from adag.errors import AdagError
from adag.report.config import DEFAULT_PROMPTS
from adag.report.data import chosen_prompts, graph_of, payload_json, run_payload
from adag.view import RunView

FRAME_HEIGHT = 760  # pixels of the notebook cell's frame


@dataclass
class Shown:
    """What `adag.show` displayed: the run, the selection (keys as the page's URL and `window.adag.state()`
    use them) and, where the viewer is served, its address."""

    run: Path
    prompt: int
    cluster: int | None = None
    pins: list[str] = field(default_factory=list)
    url: str | None = None
    height: int = FRAME_HEIGHT

    @property
    def state(self) -> dict:
        return {"prompt": self.prompt, "cluster": self.cluster, "pins": list(self.pins)}

    @property
    def fragment(self) -> str:
        """The page's URL fragment for this selection."""
        values = {"prompt": self.prompt, **({"cluster": self.cluster} if self.cluster is not None else {}),
                  **({"pins": ",".join(self.pins)} if self.pins else {})}
        return urlencode(values, safe=":,")

    def graph(self) -> dict:
        """The prompt's graph as `window.adag.graph()` gives it: every node key and every edge as
        [source key, target key, weight]."""
        graph = graph_of(RunView.open(self.run), self.prompt)
        nodes = graph.nodes
        keys = [node_key(kind, layer, position, neuron, rank) for kind, layer, position, neuron, rank in zip(
            nodes["kind"], nodes["layer"], nodes["position"], nodes["neuron"],
            (nodes["kind"] == "logit").cumsum() - 1)]
        edges = graph.edges
        return {"nodes": keys, "edges": [[keys[s], keys[t], float(w)] for s, t, w in
                                         zip(edges["source"], edges["target"], edges["weight"])]}

    def page(self) -> str:
        """The self-contained page, opened at this selection."""
        from adag.report.html import render_page

        view = RunView.open(self.run)
        chosen = sorted(set(chosen_prompts(view, DEFAULT_PROMPTS)) | {self.prompt})
        return render_page(payload_json(run_payload(view, chosen) | {"initial": self.fragment}))

    def __repr__(self) -> str:
        return f"Shown({self.run}, {self.state}{f', served at {self.url}' if self.url else ''})"

    def html(self) -> str:
        """The notebook cell's HTML: a frame with the page, or with the served viewer."""
        if self.url is not None:
            source = f'src="{html.escape(self.url.rstrip("/") + "/#" + self.fragment)}"'
        else:
            source = f'srcdoc="{html.escape(self.page())}" sandbox="allow-scripts allow-downloads"'
        return (f'<iframe {source} style="width: 100%; height: {self.height}px; border: 1px solid #ddd" '
                f'title="adag viewer of {html.escape(self.run.name)}"></iframe>')


def node_key(kind: str, layer: float, position: int, neuron: int, rank: int) -> str:
    """A node's key as the page writes it: n:layer:position:neuron, e:position or l:rank."""
    if kind == "neuron":
        return f"n:{int(layer)}:{int(position)}:{int(neuron)}"
    if kind == "embedding":
        return f"e:{int(position)}"
    return f"l:{int(rank)}"


def show(run: str | Path, prompt: int | None = None, cluster: int | None = None, pins: list[str] | None = None,
         server=None, height: int = FRAME_HEIGHT) -> Shown:
    """Show a clustered run's viewer in the notebook, opened at `prompt` (default: the first) with `cluster`
    selected and `pins` pinned. `server` is a served viewer (`serve_in_background(run, embeddable=True)`) or
    its address, for steering from the page. Displays it when run in a notebook; returns the selection."""
    view = RunView.open(run)
    view.require("cluster")
    prompts = view.prompts["prompt"].astype(int).tolist()
    prompt = prompts[0] if prompt is None else int(prompt)
    if prompt not in prompts:
        raise AdagError(f"no prompt {prompt} in {view.path}; prompts are {min(prompts)}..{max(prompts)}")
    if cluster is not None:
        view.check_clusters([int(cluster)])
    url = server if isinstance(server, str) or server is None else \
        f"http://{server.server_address[0]}:{server.server_address[1]}"
    shown = Shown(view.path, prompt, None if cluster is None else int(cluster), list(pins or []), url, height)
    try:
        from IPython import get_ipython
        from IPython.display import display
    except ImportError:
        return shown
    if get_ipython() is not None:
        display({"text/html": shown.html()}, raw=True)
    return shown
