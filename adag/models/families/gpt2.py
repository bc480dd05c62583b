"""GPT-2: non-gated GELU MLP, LayerNorm with biases, fused q/k/v projection (Conv1D)."""

from adag.models.families.base import FamilyAdapter, NormKind

ADAPTER = FamilyAdapter(
    model_types=("gpt2",), norm_kind=NormKind.LAYER,
    layers="transformer.h", final_norm="transformer.ln_f", unembedding="lm_head",
    mlp_act="mlp.act", mlp_out="mlp.c_proj",
    attention_fused_qkv="attn.c_attn", attention_out="attn.c_proj",
    norms=("ln_1", "ln_2"),
)
