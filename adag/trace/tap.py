"""Where tracing reads the model: the embeddings, every MLP neuron activation and the unembedding."""

from __future__ import annotations

from contextlib import ExitStack

import torch
from torch import nn

from adag.models.families import FamilyAdapter

NodeIndex = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (batch row, position, neuron)


class NeuronTap:
    """A context manager that records, during one forward pass:

    - `embeddings`: the residual stream entering the first layer, made a leaf so that gradients
      with respect to each input embedding vector can be taken;
    - `activations[l]`: layer l's neuron activations (the input of the MLP output projection);
    - `unembedded`: the output of the unembedding (logits before any soft-capping).

    With `nodes` ({layer: NodeIndex}), a zero `probes[l]` (one entry per listed node) is added to
    the activations re-entering the model, so that the gradient with respect to a probe is the
    gradient with respect to that node's activation. With `cut=True` every activation re-enters
    the model as a constant (plus its probes): gradient paths through the MLPs are cut and run only
    through the residual stream and attention, giving direct effects.
    """

    def __init__(
        self,
        model: nn.Module,
        adapter: FamilyAdapter,
        nodes: dict[int, NodeIndex] | None = None,
        cut: bool = False,
    ):
        self.model = model
        self.adapter = adapter
        self.nodes = nodes or {}
        self.cut = cut
        self.embeddings: torch.Tensor | None = None
        self.activations: dict[int, torch.Tensor] = {}
        self.probes: dict[int, torch.Tensor] = {}
        self.unembedded: torch.Tensor | None = None
        self._stack = ExitStack()

    def __enter__(self) -> NeuronTap:
        layers = self.adapter.layer_list(self.model)
        handles = [layers[0].register_forward_pre_hook(self._take_embeddings, with_kwargs=True)]
        handles += [
            layer.get_submodule(self.adapter.mlp_out).register_forward_pre_hook(self._activation_hook(index))
            for index, layer in enumerate(layers)
        ]
        handles.append(self.model.get_submodule(self.adapter.unembedding).register_forward_hook(self._take_logits))
        for handle in handles:
            self._stack.callback(handle.remove)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def _take_embeddings(self, _module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if args:
            self.embeddings = args[0].detach().requires_grad_(True)
            return (self.embeddings, *args[1:]), kwargs
        self.embeddings = kwargs["hidden_states"].detach().requires_grad_(True)
        return args, {**kwargs, "hidden_states": self.embeddings}

    def _activation_hook(self, layer: int):
        def hook(_module: nn.Module, args: tuple) -> tuple | None:
            activation = args[0]
            self.activations[layer] = activation
            passed_on = activation.detach() if self.cut else activation
            if layer in self.nodes:
                index = self.nodes[layer]
                probe = activation.new_zeros(len(index[0]), requires_grad=True)
                self.probes[layer] = probe
                passed_on = passed_on + torch.zeros_like(activation).index_put(index, probe)
            return (passed_on, *args[1:])

        return hook

    def _take_logits(self, _module: nn.Module, _args: tuple, output: torch.Tensor) -> None:
        self.unembedded = output
