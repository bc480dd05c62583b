"""Forward mode: the linearised model pushed forward on tangent rows.

The linearised model is linear in its inputs once every nonlinear coefficient is frozen (norm scales,
attention queries and keys, activation ratios, the half rule's gate and up factors) and every bias is
removed. So `e_j . d a_n / d e_j` (an input profile's numerator) is node n's value in that linear
model when the input is e_j alone, and a direct edge's numerator is the target's value when a unit of
the source neuron's output direction is added at its position and every MLP output is held (`cut`).
One tangent row per source gives that source's entry for every node at once.

A tangent pass is the model's own forward pass (so every family's attention, masking and position
handling is reused as it is) with hooks that replace each nonlinearity by its frozen linear version,
and zero biases (in a model that has any) passed through `torch.func.functional_call` (the model's
parameters are never touched). Tangent row s * B + b carries source s of prompt b. Three savings keep rows
cheap:

- Windows. A source at position p changes nothing before p, so a pass whose sources all lie at or
  after `start` runs on positions start.. only. Earlier positions carry no tangent (zero values), so
  they enter attention only through the softmax's normaliser: the window's attention, a softmax over
  the window's keys, times each query's share of attention inside the window (in the frozen pattern),
  is the full attention. The shares are measured once per window by the model's own attention
  (`attention_inside`), so every family's masking, sliding windows and soft-capping stay its own.
  A source at the last position costs one position per row.
- Rows enter at their source's layer. A row's tangent is zero below the layer its source is injected
  at, so each layer runs on the rows whose source lies at or below it (`_rows_entering`): in the edges,
  a neuron source's row skips the layers below the neuron.
- With `cut`, no MLP runs: its output is zero (plus the sources injected there) and a node's value is
  its readout r_n = d a_n / d x_n applied to the MLP input x_n; nor do frozen query/key projections run.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import suppress
from dataclasses import dataclass, replace
from functools import cached_property

import torch
from torch import nn
from torch.func import functional_call

from adag.models import LoadedModel
from adag.models.families import FamilyAdapter
from adag.trace.batch import PromptBatch
from adag.trace.config import TraceConfig
from adag.trace.passes import LinearisedPass, rows_per_pass
from adag.trace.rules import (
    FrozenAttentionPattern,
    FrozenNormScale,
    FrozenValues,
    Hook,
    TangentRows,
    hooks_installed,
    layer_names,
    rule_set,
    split_fused_qkv,
)
from adag.trace.tap import NodeIndex, mlp_path

# A pass's fixed cost (hooks, reading every weight once) in units of one tangent row
# over one position: the planner starts a new, later window when widening the current one would cost
# its rows more than this. Measured on the built-in model (CPU, fp32, 39-token prompts, one trace's
# profiles and edges at 0, 2, 4, 8, 16, 24, 64 and 160): 8-64 within noise of each other, 0-4 and 160
# slower; again with windows that attend within themselves: 16 best, 4 and 64 slower (edges alone: 16-64
# alike, 256 slower).
PASS_COST_IN_ROWS = 16


@dataclass
class Injections:
    """The tangent's sources: row `slot * B + row` gets `vector` added at `position`, to the input of the
    first layer (`layer` -1) or to the output of layer `layer`'s MLP."""

    slot: torch.Tensor
    row: torch.Tensor
    layer: torch.Tensor
    position: torch.Tensor
    vector: torch.Tensor  # (n, d)

    def at(self, layer: int) -> torch.Tensor:
        return (self.layer == layer).nonzero(as_tuple=True)[0]


@dataclass
class Reads:
    """What a tangent pass reads: nodes' values, {layer: (row, position, neuron)}; with `readouts`
    ({layer: (K_layer, d)}, cut passes) as r_n . (MLP input); and with `logits` (B, k, d), the target
    logits as `logits` . (final norm output at the last position)."""

    nodes: dict[int, NodeIndex]
    readouts: dict[int, torch.Tensor] | None = None
    logits: torch.Tensor | None = None

    @cached_property
    def readout_groups(self) -> dict[int, list[tuple[int, int, slice, torch.Tensor]]]:
        """Per layer, per run of nodes at one (prompt row, position) (nodes are ordered by row and position
        within a layer, so one run each): the prompt row, the position, the run's ids and its readouts
        (d, n), so that a cut pass reads a position's nodes with one product, the same in every window."""
        groups: dict[int, list[tuple[int, int, slice, torch.Tensor]]] = {}
        for layer, (row, position, _) in self.nodes.items():
            places = torch.stack([row, position], 1)
            _, counts = places.unique_consecutive(dim=0, return_counts=True)
            runs = [slice(end - count, end) for end, count in zip(counts.cumsum(0).tolist(), counts.tolist())]
            groups[layer] = [(*places[run.start].tolist(), run, self.readouts[layer][run].T) for run in runs]
        return groups


@dataclass
class Window:
    """One tangent pass: source slots first..stop over the positions from `start` on, with each query's
    share of attention inside the window per layer ((B, T - start, heads); None for a window from 0)."""

    first: int
    stop: int
    start: int
    inside: list[torch.Tensor] | None

    @property
    def sources(self) -> int:
        return self.stop - self.first


@dataclass
class BasePass:
    """A linearised forward pass of a batch with its frozen constants: what tangent passes start from."""

    batch: PromptBatch
    linear_pass: LinearisedPass
    frozen: FrozenValues
    _zero_biases: dict[str, torch.Tensor] | None = None

    def zero_biases(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Zeros for every bias of the model, made once for all of this batch's tangent passes."""
        if self._zero_biases is None:
            self._zero_biases = {name: torch.zeros_like(p) for name, p in model.named_parameters()
                                 if name.endswith("bias")}
        return self._zero_biases

    def logit_readouts(self, lm: LoadedModel) -> torch.Tensor:
        """(B, k, d): d logit_i / d (final norm output at the last position) for each prompt's targets,
        soft-capping linearised as the pass did (the ratio of capped to uncapped logit)."""
        unembedding = lm.model.get_submodule(lm.adapter.unembedding).weight[self.linear_pass.targets.ids]
        uncapped = self.linear_pass.tap.unembedded[:, -1].detach().gather(-1, self.linear_pass.targets.ids)
        capped = self.linear_pass.target_logits.detach().to(uncapped.dtype)
        ratio = torch.where(uncapped == 0, torch.zeros_like(uncapped), capped / uncapped)
        return unembedding * ratio[..., None].to(unembedding.dtype)


class _Done(Exception):
    """Raised once everything to read has been read: later layers are not needed."""


def push_forward(lm: LoadedModel, base: BasePass, window: Window, injections: Injections, reads: Reads,
                 cut: bool = False) -> dict[int | str, torch.Tensor]:
    """The tangent values of the window's S tangent rows per prompt carrying `injections`: per read layer
    (S, K_layer), and under "logits" (S, B, k) if asked. Without `cut` a node's value is its
    activation's tangent; with `cut` every MLP output is held (direct effects)."""
    batch, width = base.batch.input_ids.shape
    sources, start = window.sources, window.start
    rows = TangentRows(batch, start)
    # A slot's first layer with a tangent; at most the last, so that every slot reaches the final norm.
    entry = injections.layer.new_full((sources,), lm.n_layers - 1).scatter_reduce(
        0, injections.slot, injections.layer.clamp_min(0), "amin")
    entry, order = entry.sort(stable=True)
    sorted_slot = order.argsort()  # where the caller's slot s runs
    injections = replace(injections, slot=sorted_slot[injections.slot])
    first = injections.layer == -1
    tangent = injections.vector.new_zeros(sources, batch, width - start, injections.vector.shape[-1])
    tangent[injections.slot[first], injections.row[first], injections.position[first] - start] = \
        injections.vector[first]
    read: dict[int | str, torch.Tensor] = {}
    hooks = _tangent_hooks(lm.model, lm.adapter, base.frozen, rows, tangent.flatten(0, 1), injections, reads,
                           read, cut)
    if window.inside is not None:
        hooks += _window_attention(lm, window.inside, rows)
    if int(entry[-1]) > 0:  # after the tap, whose hook on the first layer feeds every row in
        hooks += _rows_entering(lm, entry, batch)
    _run(lm, base, hooks, start, sources)
    return {key: value[sorted_slot.to(value.device)] for key, value in read.items()}


def _rows_entering(lm: LoadedModel, entry: torch.Tensor, batch: int) -> list[Hook]:
    """Each layer runs on the slots whose first source lies at or below it (`entry`, sorted: the first
    slots; at least one, as a layer does not run on none). Later slots join as zeros, which the
    linearised, bias-free layers would have kept at zero."""
    all_rows = len(entry) * batch

    def narrowing_to(rows: int):
        def narrow(x):  # per-row arguments (masks, position embeddings); 1-D ones (cache positions) are not
            if isinstance(x, torch.Tensor):
                return x[:rows] if x.dim() > 1 and len(x) == all_rows else x
            if isinstance(x, (tuple, list)):
                items = [narrow(item) for item in x]
                return type(x)(*items) if hasattr(x, "_fields") else type(x)(items)  # named tuples too
            return {name: narrow(value) for name, value in x.items()} if isinstance(x, dict) else x

        def hook(_m: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            hidden = args[0] if args else kwargs["hidden_states"]
            if len(hidden) < rows:
                hidden = torch.cat([hidden, hidden.new_zeros(rows - len(hidden), *hidden.shape[1:])])
            hidden = hidden[:rows]  # the first layer gets every row from the tap
            if args:
                return (hidden, *narrow(args[1:])), narrow(kwargs)
            return args, {**narrow(kwargs), "hidden_states": hidden}
        return hook

    layers = torch.arange(lm.n_layers, device=entry.device)
    rows_per_layer = torch.searchsorted(entry, layers, right=True).clamp_min(1) * batch
    return [Hook(f"{lm.adapter.layers}.{layer}", narrowing_to(int(rows)), pre=True, with_kwargs=True)
            for layer, rows in enumerate(rows_per_layer.tolist())]


def _run(lm: LoadedModel, base: BasePass, hooks: list[Hook], start: int, repeats: int) -> None:
    """The model's own forward pass over the batch's positions from `start` on, each prompt `repeats`
    times, under `hooks` and with zero biases, until a hook has read the last thing it needs."""
    inputs = {name: getattr(base.batch, name)[:, start:].repeat(repeats, 1)
              for name in ("input_ids", "attention_mask", "position_ids")}
    kwargs = {**inputs, "logits_to_keep": 1, "use_cache": False}
    with torch.no_grad(), hooks_installed(lm.model, hooks), suppress(_Done):
        if biases := base.zero_biases(lm.model):
            functional_call(lm.model, biases, kwargs=kwargs)
        else:  # nothing to swap: functional_call would still walk every parameter
            lm.model(**kwargs)


def plan_windows(lm: LoadedModel, config: TraceConfig, base: BasePass, latest_first: list[int],
                 cut: bool) -> Iterator[Window]:
    """Passes over sources ordered latest position first (`latest_first[s]`: the earliest position of
    source slot s over the batch's prompts). A pass widens its window for one more source while that
    costs its rows less than a new pass would cost (PASS_COST_IN_ROWS), and takes as many rows as the
    working-memory budget holds (`row_bytes`). The windows' attention shares are measured as they are
    reached, as many windows at once as the budget holds."""
    width = base.batch.input_ids.shape[1]
    device = base.batch.input_ids.device

    def fits(rows: int, start: int) -> bool:
        return rows <= rows_per_pass(config, device, row_bytes(lm, base, width - start, cut))

    spans, first = [], 0
    while first < len(latest_first):
        start, stop = latest_first[first], first + 1
        while stop < len(latest_first):
            position = min(start, latest_first[stop])
            if (stop - first) * (start - position) > PASS_COST_IN_ROWS or not fits(stop + 1 - first, position):
                break
            start, stop = position, stop + 1
        spans.append((first, stop, start))
        first = stop
    measured_at_once = _head_dim(lm) * rows_per_pass(config, device, row_bytes(lm, base, width, cut=True))
    for chunk in range(0, len(spans), measured_at_once):
        part = spans[chunk:chunk + measured_at_once]
        inside = attention_inside(lm, base, sorted({start for _, _, start in part} - {0}))
        yield from (Window(*span, inside.get(span[2])) for span in part)


def row_bytes(lm: LoadedModel, base: BasePass, window: int, cut: bool) -> int:
    """What one tangent row per prompt holds in a pass over `window` positions: per position a layer's
    hidden states (a few d-wide tensors; without `cut` also the MLP's, a few neuron-wide ones), and
    the attention's scores and weights (window x window per head)."""
    batch, _, d_model = base.linear_pass.tap.embeddings.shape
    per_position = 8 * d_model + (0 if cut else 4 * lm.n_neurons)
    scores = 2 * lm.model.config.num_attention_heads * window * window
    return batch * (window * per_position + scores) * base.linear_pass.tap.embeddings.element_size()


def attention_inside(lm: LoadedModel, base: BasePass, starts: list[int]) -> dict[int, list[torch.Tensor]]:
    """Per start, per layer, (B, T - start, heads): each query's attention weight summed over the keys
    from `start` on, in the frozen pattern. A probe pass runs the model's own attention with the frozen
    queries and keys and values that are indicators: channel j of a head's value is 1 on the keys from
    start j on, 0 before, so channel j of each head's output is that sum (a row holds head_dim starts).
    Nothing else runs but a fused q/k/v projection (MLPs and other projections give zeros)."""
    if not starts:
        return {}
    batch, width = base.batch.input_ids.shape
    adapter, heads, head_dim = lm.adapter, lm.model.config.num_attention_heads, _head_dim(lm)
    groups = -(-len(starts) // head_dim)
    rows = TangentRows(batch, 0)
    bounds = torch.tensor(starts + [width] * (groups * head_dim - len(starts)), device=base.batch.input_ids.device)
    keys = torch.arange(width, device=bounds.device)
    indicators = (keys[None, :, None] >= bounds.view(groups, 1, head_dim))  # (groups, T, head_dim)
    indicators = indicators[:, None].expand(-1, batch, -1, -1).flatten(0, 1).to(base.linear_pass.tap.embeddings.dtype)
    shares: list[torch.Tensor] = []  # per layer (groups * B, T, heads, head_dim)
    outputs = layer_names(lm.model, adapter, adapter.attention_out)

    def values(_m: nn.Module, _args: tuple, out: torch.Tensor) -> torch.Tensor:
        if adapter.attention_fused_qkv:  # after the rule's hook has put the frozen queries and keys in
            query_key, value = split_fused_qkv(out)
            return torch.cat([query_key, indicators.to(value).repeat(1, 1, value.shape[-1] // head_dim)], dim=-1)
        return indicators.to(out).repeat(1, 1, out.shape[-1] // head_dim)  # .to: under a device map, the layer's

    def read(layer: int):
        def hook(_m: nn.Module, args: tuple) -> None:
            shares.append(args[0].detach().unflatten(-1, (heads, head_dim)).nan_to_num(0.0))
            if layer == len(outputs) - 1:
                raise _Done
        return hook

    if adapter.attention_fused_qkv:
        value_hooks = [Hook(name, values) for name in layer_names(lm.model, adapter, adapter.attention_fused_qkv)]
    else:
        value_hooks = [hook for name in layer_names(lm.model, adapter, adapter.attention_value)
                       for hook in (*_zeroed(name), Hook(name, values))]
    hooks = [*FrozenAttentionPattern().tangent_hooks(lm.model, adapter, base.frozen, rows),
             *_skipped_query_keys(lm.model, adapter), *value_hooks,
             *[Hook(name, read(layer), pre=True) for layer, name in enumerate(outputs)],
             *[hook for name in outputs + layer_names(lm.model, adapter, mlp_path(adapter)) for hook in _zeroed(name)]]
    _run(lm, base, hooks, 0, groups)
    return {start: [rows.split(share)[i // head_dim, :, start:, :, i % head_dim].clone() for share in shares]
            for i, start in enumerate(starts)}


def _head_dim(lm: LoadedModel) -> int:
    config = lm.model.config
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _window_attention(lm: LoadedModel, inside: list[torch.Tensor], rows: TangentRows) -> list[Hook]:
    """Scale each head's output, an attention over the window's keys only, by the query's share of
    attention inside the window: the full attention (the keys before the window carry no tangent)."""
    heads = lm.model.config.num_attention_heads

    def scaled(layer: int):
        def hook(_m: nn.Module, args: tuple) -> tuple:
            x = rows.split(args[0]).unflatten(-1, (heads, -1))  # (S, B, window, heads, head_dim)
            return ((x * inside[layer][..., None].to(x)).flatten(-2).flatten(0, 1), *args[1:])
        return hook

    return [Hook(name, scaled(layer), pre=True)
            for layer, name in enumerate(layer_names(lm.model, lm.adapter, lm.adapter.attention_out))]


def _zeroed(name: str) -> list[Hook]:
    """The module runs on no position and outputs zeros of the shape it would have had."""
    widths: list[int] = []

    def empty(_m: nn.Module, args: tuple) -> tuple:
        widths.append(args[0].shape[1])
        return (args[0][:, :0], *args[1:])

    def zeros(_m: nn.Module, _args: tuple, out: torch.Tensor) -> torch.Tensor:
        return out.new_zeros(out.shape[0], widths.pop(), *out.shape[2:])

    return [Hook(name, empty, pre=True), Hook(name, zeros)]


def _tangent_hooks(model: nn.Module, adapter: FamilyAdapter, frozen: FrozenValues, rows: TangentRows,
                   tangent: torch.Tensor, injections: Injections, reads: Reads, read: dict[int | str, torch.Tensor],
                   cut: bool) -> list[Hook]:
    """The rules' tangent hooks, then a tap that feeds `tangent` in, adds the injections at MLP outputs
    and reads what `reads` asks for."""
    nodes, sources, width = reads.nodes, len(tangent) // rows.batch, tangent.shape[1]
    last = max(nodes) if nodes and reads.logits is None else None  # the layer after which nothing is read

    def embeddings(_m: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if args:
            return (tangent, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": tangent}

    def read_activations(layer: int):
        def hook(_m: nn.Module, args: tuple) -> None:
            row, position, neuron = nodes[layer]
            inside = position >= rows.start  # nodes before the window read 0
            value = rows.split(args[0])  # (rows entered, B, ...)
            read[layer] = value.new_zeros(sources, len(row))
            read[layer][:len(value), inside] = value[:, row[inside], position[inside] - rows.start, neuron[inside]]
            if layer == last:
                raise _Done
        return hook

    def read_mlp_input(layer: int):
        def hook(_m: nn.Module, args: tuple) -> tuple:
            if layer in nodes:
                value = rows.split(args[0])  # (rows entered, B, ...)
                read[layer] = value.new_zeros(sources, len(nodes[layer][0]))
                for b, p, ids, readouts in reads.readout_groups[layer]:
                    if p >= rows.start:
                        read[layer][:len(value), ids] = value[:, b, p - rows.start] @ readouts.to(value)
            if layer == last:
                raise _Done
            return (args[0][:, :0], *args[1:])  # the MLP runs on no position: its output is replaced below
        return hook

    def mlp_output(layer: int):
        ids = injections.at(layer)

        def hook(_m: nn.Module, _args: tuple, out: torch.Tensor) -> torch.Tensor:
            if cut:  # the MLP ran on no position: zeros over the window
                out = out.new_zeros(len(out), width, out.shape[-1])
            if len(ids):
                out = rows.split(out).index_put((injections.slot[ids], injections.row[ids],
                                                 injections.position[ids] - rows.start),
                                                injections.vector[ids].to(out), accumulate=True).flatten(0, 1)
            return out
        return hook

    def read_logits(_m: nn.Module, _args: tuple, out: torch.Tensor) -> None:
        read["logits"] = torch.einsum("sbd,bkd->sbk", rows.split(out)[:, :, -1], reads.logits.to(out))
        raise _Done

    tap = [Hook(f"{adapter.layers}.0", embeddings, pre=True, with_kwargs=True)]
    mlps = layer_names(model, adapter, mlp_path(adapter))
    if cut:
        rules = [FrozenNormScale(), FrozenAttentionPattern()]
        tap += [Hook(name, read_mlp_input(layer), pre=True) for layer, name in enumerate(mlps)]
    else:
        rules = rule_set("half")
        tap += [Hook(name, read_activations(layer), pre=True)
                for layer, name in enumerate(layer_names(model, adapter, adapter.mlp_out)) if layer in nodes]
    tap += [Hook(name, mlp_output(layer)) for layer, name in enumerate(mlps) if cut or len(injections.at(layer))]
    tap += _skipped_query_keys(model, adapter)
    if reads.logits is not None:
        tap.append(Hook(adapter.final_norm, read_logits))
    return [hook for rule in rules for hook in rule.tangent_hooks(model, adapter, frozen, rows)] + tap


def _skipped_query_keys(model: nn.Module, adapter: FamilyAdapter) -> list[Hook]:
    """Separate query/key projections run on no position: the rule's tangent hook replaces their output
    with the frozen one anyway."""
    names = [name for path in adapter.attention_query_key for name in layer_names(model, adapter, path)]
    return [Hook(name, lambda _m, args: (args[0][:, :0], *args[1:]), pre=True) for name in names]
