"""Tracing: linearised (RelP) attribution graphs, attribution profiles and direct edges."""

import lazy_loader

# Lazy: the CLI imports trace.config at start-up without paying for torch.
__getattr__, __dir__, __all__ = lazy_loader.attach(__name__, submod_attrs={
    "attribute": ["attribute"],
    "batch": ["PromptBatch"],
    "edges": ["edges_pass"],
    "nodes": ["node_scores", "select_nodes"],
    "profiles": ["profiles_pass"],
    "config": ["TraceConfig"],
    "rules": ["linearised"],
    "run": ["trace_dataset"],
})
