"""Qwen2: the Llama layout with q/k/v biases (the value bias carries relevance)."""

from dataclasses import replace

from adag.models.families import llama

ADAPTER = replace(llama.ADAPTER, model_types=("qwen2",))
