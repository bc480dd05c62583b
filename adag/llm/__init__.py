"""The LLMs adag talks to: three roles (explainer, simulator, judge), the backends that play them, and
the simulator's task. Used by describe and steer; depends on nothing above adag.models."""

import lazy_loader

# Lazy: the settings models import llm.roles at start-up without loading the backends.
__getattr__, __dir__, __all__ = lazy_loader.attach(__name__, submod_attrs={
    "backends": ["Backend", "CachedBackend", "Completion", "make_backend"],
    "roles": ["Messages", "Role", "UnusableReply", "parse_spec"],
    "simulation": ["Simulation"],
})
