"""Gradient rules that linearise a model: one object per rule, with its backward and its tangent behaviour.

Each rule names the hooks it needs (`Hook`: a module name and a function). In the backward pass a
hook returns `value.detach() + (surrogate - surrogate.detach())`: numerically the original value, bit
for bit, but with the gradient of `surrogate`, the linear map the rule prescribes. Nothing global
changes (no attention implementation is swapped, no module is replaced). In a tangent pass
(`adag.trace.tangent`) the same rule's hooks replace each nonlinearity by that linear map, with the
constants the backward pass recorded into `FrozenValues`, keyed by module name.

Order. Hooks on one module run in a fixed order, which matters twice: the half rule keeps the gate
factor from the activation module's output, which must already be the linearised activation; and
anything that reads the neuron activations (the tap) must see the half rule's rewrite of the MLP
output projection's input. `hooks_installed` installs every hook adag puts on a model (the rules, the
tap, steering): on each module they run in the order they were installed, so hooks installed inside
another `hooks_installed` block (a tap while steering) see what the outer ones did.
`linearised` lists the rules in the order of their rule set, then the caller's hooks (`after`).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode

from adag.models.families import FamilyAdapter, NormKind

RuleSet = Literal["half", "no_half", "plain"]


@dataclass
class FrozenValues:
    """The constants of one linearised forward pass, detached, keyed by the name of the module whose
    output (or, for the gate and up factors, the layer's MLP output projection's input) they freeze."""

    norm_scales: dict[str, torch.Tensor] = field(default_factory=dict)  # norm -> (B, T, 1)
    queries_keys: dict[str, torch.Tensor] = field(default_factory=dict)  # q/k (or fused q/k/v) projection -> output
    ratios: dict[str, torch.Tensor] = field(default_factory=dict)  # activation -> act(z) / z
    gates: dict[str, torch.Tensor] = field(default_factory=dict)  # MLP output projection -> act(gate)
    ups: dict[str, torch.Tensor] = field(default_factory=dict)  # MLP output projection -> up projection


@dataclass(frozen=True)
class Hook:
    """`function` as a forward hook (or, with `pre`, a forward pre-hook) of the module named `module`."""

    module: str
    function: Callable
    pre: bool = False
    with_kwargs: bool = False


class _Chain:
    """The hooks of one kind (pre or not) that `hooks_installed` keeps on one module, in installation
    order, run by one PyTorch hook registered with `prepend` (before hooks registered by other means)."""

    def __init__(self, module: nn.Module, pre: bool):
        self.hooks: list[Hook] = []
        register = module.register_forward_pre_hook if pre else module.register_forward_hook
        self.handle = register(self._pre if pre else self._post, prepend=True, with_kwargs=True)

    def _pre(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        for hook in self.hooks:
            if hook.with_kwargs:
                args, kwargs = hook.function(module, args, kwargs) or (args, kwargs)
            else:
                result = hook.function(module, args)
                args = args if result is None else result if isinstance(result, tuple) else (result,)
        return args, kwargs

    def _post(self, module: nn.Module, args: tuple, kwargs: dict, output: object) -> object:
        for hook in self.hooks:
            result = hook.function(module, args, kwargs, output) if hook.with_kwargs else \
                hook.function(module, args, output)
            output = output if result is None else result
        return output


_chains: weakref.WeakKeyDictionary[nn.Module, dict[bool, _Chain]] = weakref.WeakKeyDictionary()


@contextmanager
def hooks_installed(model: nn.Module, hooks: Sequence[Hook]) -> Iterator[None]:
    """Install `hooks`, removed on exit (also on error; the module is left as it was). On each module
    they run in list order, after the hooks of the `hooks_installed` blocks around this one and before
    any hook registered there by other means."""
    added: list[tuple[nn.Module, bool, Hook]] = []
    modules = dict(model.named_modules())  # one walk, not a path lookup per hook
    try:
        for hook in hooks:
            module = modules[hook.module] if hook.module in modules else model.get_submodule(hook.module)
            chains = _chains.setdefault(module, {})
            if hook.pre not in chains:
                chains[hook.pre] = _Chain(module, hook.pre)
            chains[hook.pre].hooks.append(hook)
            added.append((module, hook.pre, hook))
        yield
    finally:
        for module, pre, hook in reversed(added):
            chain = _chains[module][pre]
            del chain.hooks[max(i for i, h in enumerate(chain.hooks) if h is hook)]
            if not chain.hooks:
                chain.handle.remove()
                del _chains[module][pre]


def layer_names(model: nn.Module, adapter: FamilyAdapter, path: str) -> list[str]:
    """The full module name of `path` (relative to a layer) in every layer, bottom up."""
    return [f"{adapter.layers}.{layer}.{path}" for layer in range(len(adapter.layer_list(model)))]


def norm_names(model: nn.Module, adapter: FamilyAdapter) -> list[str]:
    """Every norm's module name, per layer then the final norm (the order of `adapter.norm_modules`)."""
    per_layer = [f"{adapter.layers}.{layer}.{path}" for layer in range(len(adapter.layer_list(model)))
                 for path in adapter.norms]
    return [*per_layer, adapter.final_norm]


@dataclass(frozen=True)
class TangentRows:
    """Tangent rows: row s * B + b carries source s of prompt b, so a base-pass constant (B, T, ...)
    broadcasts against the rows viewed as (S, B, ...) without copies. The rows cover the positions
    from `start` on (a window; the tangent is zero before it), so constants are sliced to them. A layer
    may run on the first S' < S sources only (those that have entered), so shapes follow the tensor."""

    batch: int
    start: int = 0

    def split(self, x: torch.Tensor) -> torch.Tensor:
        """(S * B, ...) -> (S, B, ...)."""
        return x.unflatten(0, (-1, self.batch))

    def per_row(self, constant: torch.Tensor) -> torch.Tensor:
        """A base-pass constant (B, T, ...) at the window's positions, broadcast against rows viewed as (S, B, ...)."""
        return constant[None, :, self.start:]

    def repeat(self, constant: torch.Tensor, rows_like: torch.Tensor) -> torch.Tensor:
        """A base-pass constant (B, T, ...) at the window's positions, repeated for as many sources as
        `rows_like` has rows: (S * B, ...)."""
        window = constant[:, self.start:]
        return window[None].expand(len(rows_like) // self.batch, *window.shape).flatten(0, 1)


class Rule:
    """One linearisation rule: the hooks of its backward pass, those of its tangent pass, and a
    context that the backward pass also needs (none by default)."""

    def hooks(self, model: nn.Module, adapter: FamilyAdapter, frozen: FrozenValues | None) -> list[Hook]:
        raise NotImplementedError

    def tangent_hooks(self, model: nn.Module, adapter: FamilyAdapter, frozen: FrozenValues,
                      rows: TangentRows) -> list[Hook]:
        raise NotImplementedError

    def context(self) -> AbstractContextManager:
        return nullcontext()


def with_gradient_of(value: torch.Tensor, surrogate: torch.Tensor) -> torch.Tensor:
    """`value` in the forward pass, `surrogate`'s gradient in the backward pass."""
    return value.detach() + (surrogate - surrogate.detach())


def activation_ratio(z: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """f(z) / z for `out = f(z)`, taken as f(0) (= 0 for activation functions) at z = 0."""
    return out / torch.where(z == 0, torch.ones_like(z), z)


def linear_through_origin(z: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """`out = f(z)` elementwise, rewritten as z * stopgrad(f(z) / z)."""
    return with_gradient_of(out, z * activation_ratio(z, out).detach())


def norm_weight(module: nn.Module, kind: NormKind, dtype: torch.dtype) -> torch.Tensor:
    """The norm's elementwise gain (1 + weight for Gemma's norms)."""
    return module.weight.to(dtype) + (1.0 if kind is NormKind.RMS_PLUS_ONE else 0.0)


def split_fused_qkv(out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A fused projection's output as (queries and keys, values)."""
    return out.split([2 * out.shape[-1] // 3, out.shape[-1] // 3], dim=-1)


class FrozenNormScale(Rule):
    """Norms: y = x * stopgrad(scale(x)); LayerNorm keeps its (linear) mean subtraction and bias."""

    def hooks(self, model: nn.Module, adapter: FamilyAdapter, frozen: FrozenValues | None) -> list[Hook]:
        kind = adapter.norm_kind

        def backward(name: str):
            def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
                x = args[0]
                eps = getattr(module, "variance_epsilon", None) or getattr(module, "eps", 1e-6)
                x32 = x.to(torch.promote_types(x.dtype, torch.float32))
                if kind is NormKind.LAYER:
                    x32 = x32 - x32.mean(-1, keepdim=True)
                scale = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps).detach()
                if frozen is not None:
                    frozen.norm_scales[name] = scale
                surrogate = x32 * (scale * norm_weight(module, kind, x32.dtype))
                if getattr(module, "bias", None) is not None:
                    surrogate = surrogate + module.bias.to(x32.dtype)
                return with_gradient_of(output, surrogate.to(output.dtype))

            return hook

        return [Hook(name, backward(name)) for name in norm_names(model, adapter)]

    def tangent_hooks(self, model: nn.Module, adapter: FamilyAdapter, frozen: FrozenValues,
                      rows: TangentRows) -> list[Hook]:
        kind = adapter.norm_kind

        def tangent(name: str):
            def hook(module: nn.Module, args: tuple, _out: torch.Tensor) -> torch.Tensor:
                x = args[0]
                if kind is NormKind.LAYER:
                    x = x - x.mean(-1, keepdim=True)
                scale = rows.per_row(frozen.norm_scales[name]) * norm_weight(module, kind, x.dtype)
                return (rows.split(x) * scale).flatten(0, 1).to(x.dtype)

            return hook

        return [Hook(name, tangent(name)) for name in norm_names(model, adapter)]


class FrozenAttentionPattern(Rule):
    """Attention: the softmax pattern is a constant. Stopping the gradient of queries and keys does
    exactly that for any attention implementation, and keeps its masking as it is.

    Its backward context, `BatchableAttention`, routes the gradient of fused attention kernels
    through the math kernel (see there)."""

    @staticmethod
    def _query_key_names(model: nn.Module, adapter: FamilyAdapter) -> list[str]:
        return [name for path in adapter.attention_query_key for name in layer_names(model, adapter, path)]

    @staticmethod
    def _fused_names(model: nn.Module, adapter: FamilyAdapter) -> list[str]:
        return layer_names(model, adapter, adapter.attention_fused_qkv) if adapter.attention_fused_qkv else []

    def hooks(self, model: nn.Module, adapter: FamilyAdapter, frozen: FrozenValues | None) -> list[Hook]:
        def query_key(name: str):
            def hook(_module: nn.Module, _args: tuple, out: torch.Tensor) -> torch.Tensor:
                if frozen is not None:
                    frozen.queries_keys[name] = out.detach()
                return out.detach()

            return hook

        def fused(name: str):
            def hook(_module: nn.Module, _args: tuple, out: torch.Tensor) -> torch.Tensor:
                query_key, value = split_fused_qkv(out)
                if frozen is not None:
                    frozen.queries_keys[name] = query_key.detach()
                return torch.cat([query_key.detach(), value], dim=-1)

            return hook

        return ([Hook(name, query_key(name)) for name in self._query_key_names(model, adapter)]
                + [Hook(name, fused(name)) for name in self._fused_names(model, adapter)])

    def tangent_hooks(self, model: nn.Module, adapter: FamilyAdapter, frozen: FrozenValues,
                      rows: TangentRows) -> list[Hook]:
        def query_key(name: str):
            def hook(_m: nn.Module, _args: tuple, out: torch.Tensor) -> torch.Tensor:
                return rows.repeat(frozen.queries_keys[name], out)

            return hook

        def fused(name: str):
            def hook(_m: nn.Module, _args: tuple, out: torch.Tensor) -> torch.Tensor:
                return torch.cat([rows.repeat(frozen.queries_keys[name], out), split_fused_qkv(out)[1]], dim=-1)

            return hook

        return ([Hook(name, query_key(name)) for name in self._query_key_names(model, adapter)]
                + [Hook(name, fused(name)) for name in self._fused_names(model, adapter)])

    def context(self) -> AbstractContextManager:
        return BatchableAttention()


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


class LinearisedActivation(Rule):
    """Activation functions: act(z) = z * stopgrad(act(z) / z), with act(z)/z taken as 0 at z = 0."""

    def hooks(self, model: nn.Module, adapter: FamilyAdapter, frozen: FrozenValues | None) -> list[Hook]:
        def backward(name: str):
            def hook(_module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
                if frozen is not None:
                    frozen.ratios[name] = activation_ratio(args[0], out).detach()
                return linear_through_origin(args[0], out)

            return hook

        return [Hook(name, backward(name)) for name in layer_names(model, adapter, adapter.mlp_act)]

    def tangent_hooks(self, model: nn.Module, adapter: FamilyAdapter, frozen: FrozenValues,
                      rows: TangentRows) -> list[Hook]:
        def tangent(name: str):
            def hook(_m: nn.Module, args: tuple, _out: torch.Tensor) -> torch.Tensor:
                return (rows.split(args[0]) * rows.per_row(frozen.ratios[name])).flatten(0, 1)

            return hook

        return [Hook(name, tangent(name)) for name in layer_names(model, adapter, adapter.mlp_act)]


class HalfRuleGate(Rule):
    """Gated MLPs: the product g * u sends half of the gradient x activation to each factor.

    Per layer it keeps the outputs of the activation (g) and of the up projection (u), and rewrites
    the input of the output projection from them. Its hook on the activation must run after
    `LinearisedActivation`'s, so that g carries the linearised gradient: the rule sets list it later.
    """

    def hooks(self, model: nn.Module, adapter: FamilyAdapter, frozen: FrozenValues | None) -> list[Hook]:
        def split(name: str, factors: dict[str, torch.Tensor]):
            def hook(_m: nn.Module, args: tuple) -> tuple:
                g, u = factors.pop("gate"), factors.pop("up")
                if frozen is not None:
                    frozen.gates[name], frozen.ups[name] = g.detach(), u.detach()
                surrogate = 0.5 * (g * u.detach() + g.detach() * u)
                return (with_gradient_of(args[0], surrogate), *args[1:])

            return hook

        return self._layer_hooks(model, adapter, split)

    def tangent_hooks(self, model: nn.Module, adapter: FamilyAdapter, frozen: FrozenValues,
                      rows: TangentRows) -> list[Hook]:
        def split(name: str, factors: dict[str, torch.Tensor]):
            def hook(_m: nn.Module, args: tuple) -> tuple:  # d(g * u) = 0.5 * (dg * u + g * du)
                g_t, u_t = rows.split(factors.pop("gate")), rows.split(factors.pop("up"))
                value = 0.5 * (g_t * rows.per_row(frozen.ups[name]) + rows.per_row(frozen.gates[name]) * u_t)
                return (value.flatten(0, 1), *args[1:])

            return hook

        return self._layer_hooks(model, adapter, split)

    @staticmethod
    def _layer_hooks(model: nn.Module, adapter: FamilyAdapter, split: Callable) -> list[Hook]:
        """Per layer: keep g and u (in a store of that layer's own), and `split(mlp_out name, store)`."""
        if not adapter.gated:
            return []

        def keep(name: str, factors: dict[str, torch.Tensor]):
            def hook(_m: nn.Module, _a: tuple, out: torch.Tensor) -> None:
                factors[name] = out

            return hook

        hooks = []
        names = zip(layer_names(model, adapter, adapter.mlp_act), layer_names(model, adapter, adapter.mlp_up),
                    layer_names(model, adapter, adapter.mlp_out))
        for act, up, out in names:
            factors: dict[str, torch.Tensor] = {}
            hooks += [Hook(act, keep("gate", factors)), Hook(up, keep("up", factors)),
                      Hook(out, split(out, factors), pre=True)]
        return hooks


RULE_SETS: dict[str, tuple[type[Rule], ...]] = {
    "half": (FrozenNormScale, FrozenAttentionPattern, LinearisedActivation, HalfRuleGate),
    "no_half": (FrozenNormScale, FrozenAttentionPattern, LinearisedActivation),
    "plain": (),
}


def rule_set(rules: RuleSet) -> list[Rule]:
    """The rules of a named set, in the order their hooks run on a shared module."""
    if rules not in RULE_SETS:
        raise ValueError(f"unknown rule set {rules!r}; use one of {', '.join(RULE_SETS)}")
    return [rule() for rule in RULE_SETS[rules]]


@contextmanager
def linearised(model: nn.Module, adapter: FamilyAdapter, rules: RuleSet = "half",
               frozen: FrozenValues | None = None, after: Sequence[Hook] = ()) -> Iterator[None]:
    """Apply a named rule set ("half", "no_half" or "plain") for the duration of the block,
    recording the frozen constants into `frozen` if given. `after`: hooks that must see the rules'
    rewrites (a tap), run after the rules' hooks on the same module."""
    chosen = rule_set(rules)
    hooks = [hook for rule in chosen for hook in rule.hooks(model, adapter, frozen)]
    with ExitStack() as stack:
        stack.enter_context(hooks_installed(model, [*hooks, *after]))
        for rule in chosen:
            stack.enter_context(rule.context())
        yield
