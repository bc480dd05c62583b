"""A backend from its spec, `KIND:MODEL[@BASE_URL]`:
    openai:gpt-4o-mini                 (key from OPENAI_API_KEY)
    openai:qwen3-8b@http://127.0.0.1:8000/v1   (vLLM, Ollama, llama.cpp server, OpenRouter, Together, ...)
    anthropic:claude-sonnet-4-5        (key from ANTHROPIC_API_KEY)
    local:qwen2.5-coder-1.5b           (transformers on this machine; no key, no network)
    embed:minilm                       (simulator only: sentence-embedding similarity, offline)
Which kinds can play which role (explainer, simulator, judge) is adag.llm.roles.
"""

from __future__ import annotations

from adag.errors import AdagError
from adag.llm.backend import Backend
from adag.llm.roles import Role, parse_spec


def make_backend(spec: str, role: Role) -> Backend:
    """Parse `KIND:MODEL[@BASE_URL]` into a backend that can play `role`."""
    try:
        parsed = parse_spec(spec, role)
    except ValueError as error:
        raise AdagError(str(error)) from None
    if parsed.kind == "local":
        from adag.llm.local import LocalBackend

        return LocalBackend(parsed.model)
    if parsed.kind == "embed":
        from adag.llm.embed import EmbeddingSimulator

        return EmbeddingSimulator(parsed.model)
    if parsed.kind == "openai":
        from adag.llm.openai_chat import OpenAIBackend

        return OpenAIBackend(parsed.model, parsed.base_url)
    if parsed.kind == "anthropic":
        from adag.llm.anthropic_chat import AnthropicBackend

        return AnthropicBackend(parsed.model, parsed.base_url)
    raise AdagError(f"'{spec}' is not an LLM backend")
