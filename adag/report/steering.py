"""Steering from the served viewer: scale a cluster (or chosen neurons) on one prompt and compare the
next-token distribution with the unsteered one. Requests are checked before the model is touched;
the model is loaded on the first request and the forward passes run one at a time."""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass

import torch

from adag.errors import parse_json
from adag.half_neurons import HalfNeuron
from adag.models import LoadedModel, run_model
from adag.report.config import MAX_MULTIPLIER
from adag.steer.evaluate import last_logits, prompt_batches
from adag.steer.intervene import scaled
from adag.view import RunView

MAX_BODY = 64 * 1024  # bytes of one request
MAX_NODES = 2048  # neurons named in one request
TOP = 10  # tokens of each distribution in the answer
FIELDS = {"prompt", "cluster", "nodes", "multiplier"}


class SteerRequestError(ValueError):
    """A request the viewer cannot steer; its message is one line naming the problem and the fix."""


@dataclass(frozen=True)
class SteerRequest:
    prompt: int
    multiplier: float
    cluster: int | None = None
    nodes: tuple[tuple[int, int, int], ...] = ()  # (layer, position, neuron)


def _integer(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SteerRequestError(f"{name} must be an integer; got {json.dumps(value)[:40]}")
    return value


class Steerer:
    """Answers POST /api/steer for one run. `load` gives the model (default: the run's own, checked
    against the traced weights), called once, on the first valid request."""

    def __init__(self, view: RunView, load: Callable[[], LoadedModel] | None = None):
        self.view = view
        self._load = load
        self._lm: LoadedModel | None = None
        self._lock = threading.Lock()
        self._prompts = view.prompts.set_index("prompt", drop=False)
        self._members = view.cluster_members

    def parse(self, body: bytes) -> SteerRequest:
        """A checked request, or SteerRequestError."""
        if len(body) > MAX_BODY:
            raise SteerRequestError(f"request body of {len(body)} bytes is over the limit of {MAX_BODY}; "
                                    "name fewer nodes, or steer a cluster")
        try:
            request = parse_json(body, unique_keys=True)
        except ValueError as error:  # also a body that is not UTF-8, or nested without end
            raise SteerRequestError(f"request body is not JSON ({str(error).splitlines()[0]}); send "
                                    '{"prompt": INT, "cluster": INT, "multiplier": FLOAT}') from None
        if not isinstance(request, dict):
            raise SteerRequestError('request body must be a JSON object: {"prompt": INT, "cluster": INT, '
                                    '"multiplier": FLOAT}')
        unknown = sorted(set(request) - FIELDS)
        if unknown:
            raise SteerRequestError(f"unknown field {unknown[0]!r}; the fields are prompt, cluster or nodes, "
                                    "and multiplier")
        prompt = _integer(request.get("prompt"), "prompt")
        if prompt not in self._prompts.index:
            ids = self._prompts.index
            raise SteerRequestError(f"no prompt {prompt} in this run; prompts are {ids.min()}..{ids.max()}")
        multiplier = request.get("multiplier")
        if isinstance(multiplier, bool) or not isinstance(multiplier, int | float) or not math.isfinite(multiplier) \
                or abs(multiplier) > MAX_MULTIPLIER:
            raise SteerRequestError(f"multiplier must be a finite number in -{MAX_MULTIPLIER:g}..{MAX_MULTIPLIER:g} "
                                    f"(0 ablates, 1 leaves the model as it is); got {json.dumps(multiplier)}")
        if ("cluster" in request) == ("nodes" in request):
            raise SteerRequestError('give either "cluster": INT or "nodes": [[layer, position, neuron], ...]')
        if "cluster" in request:
            cluster = _integer(request["cluster"], "cluster")
            if cluster not in self._members:
                raise SteerRequestError(f"no cluster {cluster} in this run; clusters are "
                                        f"{min(self._members)}..{max(self._members)}")
            return SteerRequest(prompt, float(multiplier), cluster=cluster)
        return SteerRequest(prompt, float(multiplier), nodes=self._nodes(request["nodes"], prompt))

    def _nodes(self, nodes, prompt: int) -> tuple[tuple[int, int, int], ...]:
        if not isinstance(nodes, list) or not 0 < len(nodes) <= MAX_NODES:
            raise SteerRequestError(f"nodes must be a list of 1..{MAX_NODES} [layer, position, neuron] triples")
        bounds = {"layer": self.view.model["layers"], "position": int(self._prompts.loc[prompt, "n_tokens"]),
                  "neuron": self.view.model["neurons"]}
        checked = []
        for node in nodes:
            if not isinstance(node, list) or len(node) != 3:
                raise SteerRequestError(f"each node must be [layer, position, neuron]; got {json.dumps(node)[:40]}")
            for value, (name, bound) in zip(node, bounds.items()):
                if not 0 <= _integer(value, name) < bound:
                    raise SteerRequestError(f"{name} {value} is out of range; prompt {prompt} has "
                                            f"{name}s 0..{bound - 1}")
            checked.append(tuple(node))
        return tuple(checked)

    def stop(self) -> None:
        """Wait for the steer in progress, if any, and take no more: the model must not be running in a
        thread when the process exits (torch aborts it)."""
        self._lock.acquire()

    def __call__(self, request: SteerRequest) -> dict:
        """The top TOP tokens of the next-token distribution, unsteered and steered."""
        with self._lock:
            if self._lm is None:
                self._lm = self._load() if self._load else run_model(self.view.model)
            lm = self._lm
            [(_, batch)] = prompt_batches(lm, self._prompts.loc[[request.prompt]], 1)
            baseline = last_logits(lm, batch)[0]
            with ExitStack() as stack:
                for members, positions in self._interventions(request, batch.offsets):
                    stack.enter_context(scaled(lm.model, lm.adapter, members, request.multiplier, positions))
                steered = last_logits(lm, batch)[0]
        return {"prompt": request.prompt, "multiplier": request.multiplier,
                "baseline": self._top(lm, baseline), "steered": self._top(lm, steered)}

    def _interventions(self, request: SteerRequest, offsets: torch.Tensor):
        """(half-neurons, positions) pairs: a cluster at every position, as the steer stage does by
        default, or each named neuron (both polarities) at its own position."""
        if request.cluster is not None:
            yield self._members[request.cluster], None
            return
        width = int(offsets[0]) + int(self._prompts.loc[request.prompt, "n_tokens"])
        by_position: dict[int, list[HalfNeuron]] = {}
        for layer, position, neuron in request.nodes:
            by_position.setdefault(position, []).extend([(layer, neuron, 1), (layer, neuron, -1)])
        for position, members in by_position.items():
            mask = torch.zeros((1, width), dtype=torch.bool)
            mask[0, int(offsets[0]) + position] = True
            yield members, mask

    @staticmethod
    def _top(lm: LoadedModel, logits: torch.Tensor) -> list[dict]:
        probs = logits.double().softmax(-1)
        values, ids = probs.topk(TOP)
        return [{"token": lm.tokenizer.decode([int(i)]), "prob": round(float(p), 6)} for p, i in zip(values, ids)]
