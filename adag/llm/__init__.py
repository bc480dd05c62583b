"""The LLMs adag talks to: three roles (explainer, simulator, judge), one module per backend behind one
interface (backend), the cache every request goes through (cache), and the simulator's task. Used by
describe and steer; depends on nothing above adag.models."""

import lazy_loader

# Lazy: the settings models import llm.roles at start-up without loading the backends.
__getattr__, __dir__, __all__ = lazy_loader.attach(__name__, submod_attrs={
    "anthropic_chat": ["AnthropicBackend"],
    "backend": ["Backend", "Completion", "EndpointDown", "Prediction", "RequestRejected", "TransientError",
                "expected_score"],
    "cache": ["CachedBackend", "LedgerEntry", "llm_cache_path"],
    "embed": ["EmbeddingSimulator"],
    "factory": ["make_backend"],
    "local": ["LocalBackend"],
    "openai_chat": ["OpenAIBackend"],
    "roles": ["Messages", "Role", "UnusableReply", "parse_spec"],
    "simulation": ["Simulation"],
})
