"""Descriptions: an explainer describes each cluster, a simulator scores the descriptions."""

from adag.describe.llm import CachedBackend, Completion, make_backend
from adag.describe.run import DescribeConfig, describe_run

__all__ = ["CachedBackend", "Completion", "DescribeConfig", "describe_run", "make_backend"]
