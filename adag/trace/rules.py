"""Gradient rules that linearise a model's backward pass while leaving its forward pass untouched.

Each rule is a set of hooks on the modules an adapter names. A hook returns
`value.detach() + (surrogate - surrogate.detach())`: numerically the original value, bit for bit,
but with the gradient of `surrogate`, the linear map the rule prescribes. Nothing global changes
(no attention implementation is swapped, no module is replaced), and `linearised` removes every
hook on exit, also when an exception is raised.

Given a `FrozenValues`, the rules also record what they freeze (norm scales, queries and keys,
activation ratios, gate factors), so that `adag.trace.tangent` can push tangents through the same
linear map in forward mode.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode
from torch.utils.hooks import RemovableHandle

from adag.models.families import FamilyAdapter, NormKind

RuleSet = Literal["half", "no_half", "plain"]


@dataclass
class FrozenValues:
    """The constants of one linearised forward pass, detached, keyed by module order."""

    norm_scales: dict[int, torch.Tensor] = field(default_factory=dict)  # norm index -> (B, T, 1)
    queries_keys: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)  # (layer, path) -> output
    ratios: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> act(z) / z
    gates: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> act(gate) (gated MLPs)
    ups: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> up projection (gated MLPs)


def with_gradient_of(value: torch.Tensor, surrogate: torch.Tensor) -> torch.Tensor:
    """`value` in the forward pass, `surrogate`'s gradient in the backward pass."""
    return value.detach() + (surrogate - surrogate.detach())


def activation_ratio(z: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """f(z) / z for `out = f(z)`, taken as f(0) (= 0 for activation functions) at z = 0."""
    return out / torch.where(z == 0, torch.ones_like(z), z)


def linear_through_origin(z: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """`out = f(z)` elementwise, rewritten as z * stopgrad(f(z) / z)."""
    return with_gradient_of(out, z * activation_ratio(z, out).detach())


class FrozenNormScale:
    """Norms: y = x * stopgrad(scale(x)); LayerNorm keeps its (linear) mean subtraction and bias."""

    def install(self, model: nn.Module, adapter: FamilyAdapter, frozen: FrozenValues | None) -> list[RemovableHandle]:
        kind = adapter.norm_kind
        return [norm.register_forward_hook(self._hook(kind, index, frozen))
                for index, norm in enumerate(adapter.norm_modules(model))]

    @staticmethod
    def _hook(kind: NormKind, index: int, frozen: FrozenValues | None):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            x = args[0]
            eps = getattr(module, "variance_epsilon", None) or getattr(module, "eps", 1e-6)
            x32 = x.to(torch.promote_types(x.dtype, torch.float32))
            if kind is NormKind.LAYER:
                x32 = x32 - x32.mean(-1, keepdim=True)
            scale = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps).detach()
            if frozen is not None:
                frozen.norm_scales[index] = scale
            surrogate = x32 * (scale * norm_weight(module, kind, x32.dtype))
            if getattr(module, "bias", None) is not None:
                surrogate = surrogate + module.bias.to(x32.dtype)
            return with_gradient_of(output, surrogate.to(output.dtype))

        return hook


def norm_weight(module: nn.Module, kind: NormKind, dtype: torch.dtype) -> torch.Tensor:
    """The norm's elementwise gain (1 + weight for Gemma's norms)."""
    return module.weight.to(dtype) + (1.0 if kind is NormKind.RMS_PLUS_ONE else 0.0)


class FrozenAttentionPattern:
    """Attention: the softmax pattern is a constant. Stopping the gradient of queries and keys does
    exactly that for any attention implementation, and keeps its masking as it is.

    While installed, `BatchableAttention` also routes the gradient of fused attention kernels
    through the math kernel (see there)."""

    def install(self, model: nn.Module, adapter: FamilyAdapter, frozen: FrozenValues | None) -> list[RemovableHandle]:
        handles = [
            module.register_forward_hook(self._hook(layer, path, frozen))
            for path, name in enumerate(adapter.attention_query_key)
            for layer, module in enumerate(adapter.per_layer(model, name))
        ]
        if adapter.attention_fused_qkv:
            for layer, module in enumerate(adapter.per_layer(model, adapter.attention_fused_qkv)):
                handles.append(module.register_forward_hook(self._fused_hook(layer, frozen)))
        return handles

    @staticmethod
    def _hook(layer: int, path: int, frozen: FrozenValues | None):
        def hook(_module: nn.Module, _args: tuple, out: torch.Tensor) -> torch.Tensor:
            if frozen is not None:
                frozen.queries_keys[layer, path] = out.detach()
            return out.detach()

        return hook

    @staticmethod
    def _fused_hook(layer: int, frozen: FrozenValues | None):
        def hook(_module: nn.Module, _args: tuple, out: torch.Tensor) -> torch.Tensor:
            query_key, value = split_fused_qkv(out)
            if frozen is not None:
                frozen.queries_keys[layer, 0] = query_key.detach()
            return torch.cat([query_key.detach(), value], dim=-1)

        return hook


class BatchableAttention(TorchFunctionMode):
    """`scaled_dot_product_attention` keeps its fused kernel's output, with the gradient of the same
    attention computed by the math kernel.

    Fused kernels (flash attention on CPU and GPU) have no batching rule, so a batched
    vector-Jacobian product (`is_grads_batched`) runs their backward once per cotangent row in a
    Python loop. The math kernel is plain matrix products, which batch. Values are untouched, so
    logits stay bit-identical; with queries and keys frozen the gradient is the pattern's transpose
    applied to the output gradient either way.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is not torch.nn.functional.scaled_dot_product_attention or not torch.is_grad_enabled():
            return out
        with sdpa_kernel(SDPBackend.MATH):
            surrogate = func(*args, **kwargs)
        return with_gradient_of(out, surrogate)


def split_fused_qkv(out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A fused projection's output as (queries and keys, values)."""
    return out.split([2 * out.shape[-1] // 3, out.shape[-1] // 3], dim=-1)


class LinearisedActivation:
    """Activation functions: act(z) = z * stopgrad(act(z) / z), with act(z)/z taken as 0 at z = 0."""

    def install(self, model: nn.Module, adapter: FamilyAdapter, frozen: FrozenValues | None) -> list[RemovableHandle]:
        return [act.register_forward_hook(self._hook(layer, frozen))
                for layer, act in enumerate(adapter.per_layer(model, adapter.mlp_act))]

    @staticmethod
    def _hook(layer: int, frozen: FrozenValues | None):
        def hook(_module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
            if frozen is not None:
                frozen.ratios[layer] = activation_ratio(args[0], out).detach()
            return linear_through_origin(args[0], out)

        return hook


class HalfRuleGate:
    """Gated MLPs: the product g * u sends half of the gradient x activation to each factor."""

    def install(self, model: nn.Module, adapter: FamilyAdapter, frozen: FrozenValues | None) -> list[RemovableHandle]:
        if not adapter.gated:
            return []
        handles = []
        for index, layer in enumerate(adapter.layer_list(model)):
            factors: dict[str, torch.Tensor] = {}

            def keep(name: str, store: dict = factors):
                def hook(_m: nn.Module, _a: tuple, out: torch.Tensor) -> None:
                    store[name] = out

                return hook

            def split(_m: nn.Module, args: tuple, store: dict = factors, index: int = index) -> tuple:
                g, u = store.pop("gate"), store.pop("up")
                if frozen is not None:
                    frozen.gates[index], frozen.ups[index] = g.detach(), u.detach()
                surrogate = 0.5 * (g * u.detach() + g.detach() * u)
                return (with_gradient_of(args[0], surrogate), *args[1:])

            handles += [
                layer.get_submodule(adapter.mlp_act).register_forward_hook(keep("gate")),
                layer.get_submodule(adapter.mlp_up).register_forward_hook(keep("up")),
                layer.get_submodule(adapter.mlp_out).register_forward_pre_hook(split),
            ]
        return handles


RULE_SETS: dict[str, tuple] = {
    "half": (FrozenNormScale, FrozenAttentionPattern, LinearisedActivation, HalfRuleGate),
    "no_half": (FrozenNormScale, FrozenAttentionPattern, LinearisedActivation),
    "plain": (),
}


@contextmanager
def linearised(model: nn.Module, adapter: FamilyAdapter, rules: RuleSet = "half",
               frozen: FrozenValues | None = None) -> Iterator[None]:
    """Apply a named rule set ("half", "no_half" or "plain") for the duration of the block,
    recording the frozen constants into `frozen` if given."""
    if rules not in RULE_SETS:
        raise ValueError(f"unknown rule set {rules!r}; use one of {', '.join(RULE_SETS)}")
    with ExitStack() as stack:
        for rule in RULE_SETS[rules]:
            for handle in rule().install(model, adapter, frozen):
                stack.callback(handle.remove)
        if FrozenAttentionPattern in RULE_SETS[rules]:
            stack.enter_context(BatchableAttention())
        yield
