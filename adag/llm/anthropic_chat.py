"""Chat models behind the Anthropic API (key from ANTHROPIC_API_KEY)."""

from __future__ import annotations

import os

from adag.errors import AdagError
from adag.llm.backend import Backend, Completion
from adag.llm.roles import Messages, UnusableReply
from adag.llm.sdk import sdk_errors


class AnthropicBackend(Backend):
    kind = "anthropic"

    def __init__(self, model: str, base_url: str | None = None, api_key_env: str = "ANTHROPIC_API_KEY"):
        super().__init__(model, base_url)
        import anthropic

        key = os.environ.get(api_key_env)
        if key is None:
            raise AdagError(f"the anthropic backend needs an API key: set {api_key_env}")
        self.sdk = anthropic
        self.client = anthropic.Anthropic(api_key=key, base_url=base_url, max_retries=0)

    def complete(self, messages: Messages, temperature: float, max_tokens: int, logprobs: bool, seed: int,
                 timeout: float) -> Completion:
        system = "\n".join(m["content"] for m in messages if m["role"] == "system")
        chat = [m for m in messages if m["role"] != "system"]
        extra = {"system": system} if system else {}
        with sdk_errors(self.sdk, self.name):
            reply = self.client.messages.create(model=self.model, messages=chat, max_tokens=max_tokens,
                                                timeout=timeout, extra_body={"temperature": temperature}, **extra)
        if not reply.content:
            raise UnusableReply(f"{self.name} sent a reply without content")
        text = "".join(getattr(block, "text", "") for block in reply.content)
        return Completion(text, reply.usage.input_tokens, reply.usage.output_tokens)
