"""Where tracing reads the model: the embeddings, every MLP neuron activation and the unembedding."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import torch
from torch import nn

from adag.models.families import FamilyAdapter
from adag.trace.rules import FrozenValues, Hook, RuleSet, hooks_installed, layer_names, linearised

NodeIndex = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (batch row, position, neuron)


def neuron_directions(mlp_out: nn.Module) -> torch.Tensor:
    """(neurons, d_model): what one unit of each neuron adds to the MLP's output. nn.Linear stores
    (out, in) weights; GPT-2's Conv1D stores (in, out)."""
    return mlp_out.weight.T if isinstance(mlp_out, nn.Linear) else mlp_out.weight


def mlp_path(adapter: FamilyAdapter) -> str:
    """The MLP block of a layer: the module that owns the output projection."""
    return adapter.mlp_out.rpartition(".")[0]


def placement(index: NodeIndex, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """(B * T, K) one-hot matrix putting K per-node rows at their (row, position). Scattering and
    gathering by matrix product (not indexing) keeps batched backward passes batched: indexing ops
    have no batching rule and would run once per cotangent row."""
    row, position, _ = index
    matrix = torch.zeros(shape[0] * shape[1], len(row), dtype=dtype, device=row.device)
    matrix[row * shape[1] + position, torch.arange(len(row), device=row.device)] = 1
    return matrix


class NeuronTap:
    """A context manager that records, during one forward pass:

    - `embeddings`: the residual stream entering the first layer, made a leaf so that gradients
      with respect to each input embedding vector can be taken;
    - `activations[l]`: layer l's neuron activations (the input of the MLP output projection);
    - `mlp_inputs[l]`: the input of layer l's MLP (every neuron of a position reads only its row);
    - `unembedded`: the output of the unembedding (logits before any soft-capping).

    With `nodes` ({layer: NodeIndex}), zero probes make gradients with respect to single values
    cheap to take:

    - `probes[l]` (one entry per listed node): the MLP output gets `probe * direction(neuron)` at the
      node's position, so d/d probe is d/d a_node. Adding it after the output projection (not to the
      projection's input) means a backward pass never forms the gradient of every neuron at every
      position just to read a few of them.
    - `embedding_probe` (B, T): the first layer reads `e * (1 + probe)`, so d/d probe[b, j] is
      e_j . d/d e_j, an embedding's relevance, without forming the (B, T, d) gradient per row.

    With `cut=True` every activation re-enters the model as a constant (plus its probes): gradient
    paths through the MLPs are cut and run only through the residual stream and attention, giving
    direct effects.
    """

    def __init__(self, model: nn.Module, adapter: FamilyAdapter, nodes: dict[int, NodeIndex] | None = None,
                 cut: bool = False):
        self.model = model
        self.adapter = adapter
        self.nodes = nodes
        self.cut = cut
        self.embeddings: torch.Tensor | None = None
        self.embedding_probe: torch.Tensor | None = None
        self.activations: dict[int, torch.Tensor] = {}
        self.mlp_inputs: dict[int, torch.Tensor] = {}
        self.probes: dict[int, torch.Tensor] = {}
        self.unembedded: torch.Tensor | None = None
        self._stack = ExitStack()

    def hooks(self) -> list[Hook]:
        """The tap's hooks, for `hooks_installed` (or `linearised(after=...)`)."""
        model, adapter = self.model, self.adapter
        hooks = [Hook(f"{adapter.layers}.0", self._take_embeddings, pre=True, with_kwargs=True)]
        names = zip(layer_names(model, adapter, mlp_path(adapter)), layer_names(model, adapter, adapter.mlp_out))
        for index, (mlp, mlp_out) in enumerate(names):
            hooks.append(Hook(mlp, lambda _m, args, index=index: self.mlp_inputs.__setitem__(index, args[0]), pre=True))
            hooks.append(Hook(mlp_out, self._activation_hook(index), pre=True))
            if self.nodes and index in self.nodes:
                hooks.append(Hook(mlp_out, self._probe_hook(index)))
        hooks.append(Hook(adapter.unembedding, self._take_logits))
        return hooks

    def __enter__(self) -> NeuronTap:
        self._stack.enter_context(hooks_installed(self.model, self.hooks()))
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def _take_embeddings(self, _module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        hidden = args[0] if args else kwargs["hidden_states"]
        self.embeddings = hidden.detach().requires_grad_(True)
        passed_on = self.embeddings
        if self.nodes is not None:
            self.embedding_probe = hidden.new_zeros(hidden.shape[:2], requires_grad=True)
            passed_on = passed_on + passed_on * self.embedding_probe[..., None]
        if args:
            return (passed_on, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": passed_on}

    def _activation_hook(self, layer: int):
        def hook(_module: nn.Module, args: tuple) -> tuple | None:
            self.activations[layer] = args[0]
            return (args[0].detach(), *args[1:]) if self.cut else None

        return hook

    def _probe_hook(self, layer: int):
        def hook(module: nn.Module, _args: tuple, out: torch.Tensor) -> torch.Tensor:
            _, _, neuron = self.nodes[layer]
            probe = out.new_zeros(len(neuron), requires_grad=True)
            self.probes[layer] = probe
            added = placement(self.nodes[layer], out.shape[:2], out.dtype) @ (
                probe[:, None] * neuron_directions(module)[neuron].to(out.dtype))
            return out + added.view_as(out)

        return hook

    def _take_logits(self, _module: nn.Module, _args: tuple, output: torch.Tensor) -> None:
        self.unembedded = output


@contextmanager
def tapped(model: nn.Module, adapter: FamilyAdapter, rules: RuleSet, nodes: dict[int, NodeIndex] | None = None,
           cut: bool = False, frozen: FrozenValues | None = None) -> Iterator[NeuronTap]:
    """The rules and then the tap, installed by one `linearised`.

    Both the half rule and the tap hook the input of the MLP output projection: the rule must
    rewrite its gradient first, so that the activation the tap records (and, with `cut`, detaches)
    is the rule's. `linearised` runs the tap's hooks (`after`) after the rules' on every module.
    """
    tap = NeuronTap(model, adapter, nodes, cut)
    with linearised(model, adapter, rules, frozen, after=tap.hooks()):
        yield tap
