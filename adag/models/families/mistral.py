"""Mistral: the Llama layout (sliding-window attention does not change the paths)."""

from dataclasses import replace

from adag.models.families import llama

ADAPTER = replace(llama.ADAPTER, model_types=("mistral",))
