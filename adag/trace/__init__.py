"""Tracing: linearised (RelP) attribution graphs, attribution profiles and direct edges."""

from adag.trace.attribute import PromptBatch, attribute, edges_pass, node_scores, profiles_pass, select_nodes
from adag.trace.config import TraceConfig
from adag.trace.rules import linearised
from adag.trace.run import trace_dataset

__all__ = ["PromptBatch", "TraceConfig", "attribute", "edges_pass", "linearised", "node_scores", "profiles_pass",
           "select_nodes", "trace_dataset"]
