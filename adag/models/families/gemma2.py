"""Gemma 2: gated GELU-tanh MLP, (1 + weight) RMSNorms around both sublayers, final logit soft-capping."""

from adag.models.families.base import FamilyAdapter, NormKind

ADAPTER = FamilyAdapter(
    model_types=("gemma2",),
    layers="model.layers",
    mlp_act="mlp.act_fn",
    mlp_up="mlp.up_proj",
    mlp_out="mlp.down_proj",
    attention_query_key=("self_attn.q_proj", "self_attn.k_proj"),
    norms=(
        "input_layernorm",
        "post_attention_layernorm",
        "pre_feedforward_layernorm",
        "post_feedforward_layernorm",
    ),
    final_norm="model.norm",
    unembedding="lm_head",
    norm_kind=NormKind.RMS_PLUS_ONE,
)
