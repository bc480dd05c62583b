"""Gradient rules that linearise a model's backward pass while leaving its forward pass untouched.

Each rule is a set of hooks on the modules an adapter names. A hook returns
`value.detach() + (surrogate - surrogate.detach())`: numerically the original value, bit for bit,
but with the gradient of `surrogate`, the linear map the rule prescribes. Nothing global changes
(no attention implementation is swapped, no module is replaced), and `linearised` removes every
hook on exit, also when an exception is raised.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Literal

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from adag.models.families import FamilyAdapter, NormKind

RuleSet = Literal["half", "no_half", "plain"]


def with_gradient_of(value: torch.Tensor, surrogate: torch.Tensor) -> torch.Tensor:
    """`value` in the forward pass, `surrogate`'s gradient in the backward pass."""
    return value.detach() + (surrogate - surrogate.detach())


def linear_through_origin(z: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """`out = f(z)` elementwise, rewritten as z * stopgrad(f(z) / z) (the ratio taken as 0 at z = 0)."""
    ratio = out / torch.where(z == 0, torch.ones_like(z), z)
    return with_gradient_of(out, z * ratio.detach())


class FrozenNormScale:
    """Norms: y = x * stopgrad(scale(x)); LayerNorm keeps its (linear) mean subtraction and bias."""

    def install(self, model: nn.Module, adapter: FamilyAdapter) -> list[RemovableHandle]:
        kind = adapter.norm_kind
        return [norm.register_forward_hook(self._hook(kind)) for norm in adapter.norm_modules(model)]

    @staticmethod
    def _hook(kind: NormKind):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            x = args[0]
            eps = getattr(module, "variance_epsilon", None) or getattr(module, "eps", 1e-6)
            x32 = x.to(torch.promote_types(x.dtype, torch.float32))
            if kind is NormKind.LAYER:
                x32 = x32 - x32.mean(-1, keepdim=True)
            scale = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
            weight = module.weight.to(x32.dtype) + (1.0 if kind is NormKind.RMS_PLUS_ONE else 0.0)
            surrogate = x32 * (scale * weight).detach()
            if getattr(module, "bias", None) is not None:
                surrogate = surrogate + module.bias.to(x32.dtype)
            return with_gradient_of(output, surrogate.to(output.dtype))

        return hook


class FrozenAttentionPattern:
    """Attention: the softmax pattern is a constant. Stopping the gradient of queries and keys does
    exactly that for any attention implementation, and keeps its masking as it is."""

    def install(self, model: nn.Module, adapter: FamilyAdapter) -> list[RemovableHandle]:
        handles = [
            module.register_forward_hook(lambda _m, _a, out: out.detach())
            for path in adapter.attention_query_key
            for module in adapter.per_layer(model, path)
        ]
        if adapter.attention_fused_qkv:
            for module in adapter.per_layer(model, adapter.attention_fused_qkv):
                handles.append(module.register_forward_hook(self._fused_hook))
        return handles

    @staticmethod
    def _fused_hook(_module: nn.Module, _args: tuple, out: torch.Tensor) -> torch.Tensor:
        query_key, value = out.split([2 * out.shape[-1] // 3, out.shape[-1] // 3], dim=-1)
        return torch.cat([query_key.detach(), value], dim=-1)


class LinearisedActivation:
    """Activation functions: act(z) = z * stopgrad(act(z) / z), with act(z)/z taken as 0 at z = 0."""

    def install(self, model: nn.Module, adapter: FamilyAdapter) -> list[RemovableHandle]:
        return [act.register_forward_hook(self._hook) for act in adapter.per_layer(model, adapter.mlp_act)]

    @staticmethod
    def _hook(_module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        return linear_through_origin(args[0], out)


class HalfRuleGate:
    """Gated MLPs: the product g * u sends half of the gradient x activation to each factor."""

    def install(self, model: nn.Module, adapter: FamilyAdapter) -> list[RemovableHandle]:
        if not adapter.gated:
            return []
        handles = []
        for layer in adapter.layer_list(model):
            factors: dict[str, torch.Tensor] = {}

            def keep(name: str, store: dict = factors):
                def hook(_m: nn.Module, _a: tuple, out: torch.Tensor) -> None:
                    store[name] = out

                return hook

            def split(_m: nn.Module, args: tuple, store: dict = factors) -> tuple:
                g, u = store.pop("gate"), store.pop("up")
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
def linearised(model: nn.Module, adapter: FamilyAdapter, rules: RuleSet = "half") -> Iterator[None]:
    """Apply a named rule set ("half", "no_half" or "plain") for the duration of the block."""
    if rules not in RULE_SETS:
        raise ValueError(f"unknown rule set {rules!r}; use one of {', '.join(RULE_SETS)}")
    with ExitStack() as stack:
        for rule in RULE_SETS[rules]:
            for handle in rule().install(model, adapter):
                stack.callback(handle.remove)
        yield
