"""An independent, slow reference: the linearised model written out as a forward pass.

A reference pass records every quantity the linearisation freezes (norm scales, attention queries
and keys, activation ratios act(z)/z, both gate factors, soft-cap ratios). `forward` then computes a
forward pass in which each nonlinearity is replaced by its frozen linear version, with the gated
product written as 0.5 * (g * u_ref + g_ref * u). That forward is affine in the embeddings and in
every neuron activation, so ablating a quantity measures exactly `value * gradient` of the
linearised model, with no gradient code involved.
"""

from __future__ import annotations

import torch

from adag.models import LoadedModel, NormKind


class ExplicitLinearModel:
    def __init__(self, lm: LoadedModel, input_ids, attention_mask, position_ids):
        self.lm, self.adapter = lm, lm.adapter
        self.inputs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
        self.ref: dict = {}
        with torch.no_grad():
            self._forward(record=True)

    def _layers(self):
        return self.adapter.layer_list(self.lm.model)

    def _hooks(self, record: bool, zero_embedding, zero_neuron, hold_mlps, seen):
        a, ref, hooks = self.adapter, self.ref, []
        model = self.lm.model

        def embed(_m, args, kwargs):
            if zero_embedding is None:
                return None
            h = (args[0] if args else kwargs["hidden_states"]).clone()
            h[zero_embedding] = 0
            return ((h, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": h})

        hooks.append(self._layers()[0].register_forward_pre_hook(embed, with_kwargs=True))

        for i, norm in enumerate(a.norm_modules(model)):
            def norm_hook(module, args, out, i=i):
                x = args[0]
                eps = getattr(module, "variance_epsilon", None) or getattr(module, "eps", 1e-6)
                centred = x - x.mean(-1, keepdim=True) if a.norm_kind is NormKind.LAYER else x
                if record:
                    ref[("norm", i)] = torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + eps)
                weight = module.weight + (1.0 if a.norm_kind is NormKind.RMS_PLUS_ONE else 0.0)
                y = centred * ref[("norm", i)] * weight
                return y + module.bias if getattr(module, "bias", None) is not None else y
            hooks.append(norm.register_forward_hook(norm_hook))

        for li, layer in enumerate(self._layers()):
            for path in a.attention_query_key:
                def qk_hook(_m, _args, out, key=("qk", li, path)):
                    if record:
                        ref[key] = out
                    return ref[key]
                hooks.append(layer.get_submodule(path).register_forward_hook(qk_hook))
            if a.attention_fused_qkv:
                def fused_hook(_m, _args, out, key=("qkv", li)):
                    if record:
                        ref[key] = out
                    d = out.shape[-1] // 3
                    return torch.cat([ref[key][..., :2 * d], out[..., 2 * d:]], -1)
                hooks.append(layer.get_submodule(a.attention_fused_qkv).register_forward_hook(fused_hook))

            def act_hook(_m, args, out, li=li):
                z = args[0]
                if record:
                    ref[("ratio", li)] = out / torch.where(z == 0, torch.ones_like(z), z)
                g = z * ref[("ratio", li)]
                seen[("g", li)] = g
                return g
            hooks.append(layer.get_submodule(a.mlp_act).register_forward_hook(act_hook))
            if a.gated:
                hooks.append(layer.get_submodule(a.mlp_up).register_forward_hook(
                    lambda _m, _a, out, li=li: seen.__setitem__(("u", li), out)))

            def out_hook(_m, args, li=li):
                if a.gated:
                    g, u = seen[("g", li)], seen[("u", li)]
                    if record:
                        ref[("g", li)], ref[("u", li)] = g, u
                    act = 0.5 * (g * ref[("u", li)] + ref[("g", li)] * u)
                else:
                    act = args[0]
                if record:
                    ref[("a", li)] = act
                seen[("a", li)] = act
                passed = (ref[("a", li)] if hold_mlps else act).clone()
                if zero_neuron is not None and zero_neuron[0] == li:
                    passed[zero_neuron[1:]] = 0
                return (passed,)
            hooks.append(layer.get_submodule(a.mlp_out).register_forward_pre_hook(out_hook))

        hooks.append(model.get_submodule(a.unembedding).register_forward_hook(
            lambda _m, _a, out: seen.__setitem__("z", out)))
        return hooks

    def _forward(self, record=False, zero_embedding=None, zero_neuron=None, hold_mlps=False):
        seen: dict = {}
        hooks = self._hooks(record, zero_embedding, zero_neuron, hold_mlps, seen)
        try:
            logits = self.lm.model(**self.inputs, use_cache=False, logits_to_keep=1).logits[:, -1]
        finally:
            for hook in hooks:
                hook.remove()
        z = seen["z"][:, -1]
        if self.adapter.logit_softcap(self.lm.model):
            if record:
                self.ref["cap"] = logits / torch.where(z == 0, torch.ones_like(z), z)
            logits = z * self.ref["cap"]
        return logits, {li: seen[("a", li)] for li in range(len(self._layers()))}

    @torch.no_grad()
    def forward(self, zero_embedding=None, zero_neuron=None, hold_mlps=False):
        """Last-position logits and every layer's activations, with an embedding position
        (row, position) or a neuron (layer, row, position, neuron) set to zero."""
        return self._forward(False, zero_embedding, zero_neuron, hold_mlps)
