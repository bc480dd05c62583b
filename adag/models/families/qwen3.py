"""Qwen3: the Llama layout plus q/k norms, which only shape the (frozen) attention pattern."""

from dataclasses import replace

from adag.models.families import llama

ADAPTER = replace(llama.ADAPTER, model_types=("qwen3",))
