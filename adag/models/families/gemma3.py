"""Gemma 3 (text): the Gemma 2 layout plus q/k norms, which only shape the (frozen) attention pattern."""

from dataclasses import replace

from adag.models.families import gemma2

ADAPTER = replace(gemma2.ADAPTER, model_types=("gemma3_text",))
