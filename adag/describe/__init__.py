"""Descriptions: an explainer LLM describes each cluster, a simulator LLM scores the descriptions."""

from adag.describe.llm import CachedBackend, Completion, make_backend
from adag.describe.run import DescribeConfig, describe_run

__all__ = ["CachedBackend", "Completion", "DescribeConfig", "describe_run", "make_backend"]
