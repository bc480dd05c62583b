"""Llama (also SmolLM2): gated SiLU MLP, RMSNorm, separate q/k/v projections."""

from adag.models.families.base import FamilyAdapter, NormKind

ADAPTER = FamilyAdapter(
    model_types=("llama",), norm_kind=NormKind.RMS,
    layers="model.layers", final_norm="model.norm", unembedding="lm_head",
    mlp_act="mlp.act_fn", mlp_up="mlp.up_proj", mlp_out="mlp.down_proj",
    attention_query_key=("self_attn.q_proj", "self_attn.k_proj"), attention_value="self_attn.v_proj",
    attention_out="self_attn.o_proj",
    norms=("input_layernorm", "post_attention_layernorm"),
)
