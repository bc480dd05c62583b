"""Descriptions: an explainer describes each cluster, a simulator scores the descriptions."""

import lazy_loader

# Lazy: the CLI imports describe.config at start-up without loading the LLM backends (adag.llm).
__getattr__, __dir__, __all__ = lazy_loader.attach(__name__, submod_attrs={
    "config": ["DescribeConfig"],
    "run": ["describe_run"],
})
