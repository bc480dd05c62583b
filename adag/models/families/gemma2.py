"""Gemma 2: the Llama paths (gated GELU-tanh MLP) with (1 + weight) RMSNorms around both sublayers and
final logit soft-capping (read from the config)."""

from dataclasses import replace

from adag.models.families import llama
from adag.models.families.base import NormKind

ADAPTER = replace(
    llama.ADAPTER, model_types=("gemma2",), norm_kind=NormKind.RMS_PLUS_ONE,
    norms=("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm"),
)
