"""Chat models behind the OpenAI API: OpenAI itself, or any server that speaks it (vLLM, Ollama,
llama.cpp server, OpenRouter, ...) given as openai:MODEL@BASE_URL."""

from __future__ import annotations

import os

from adag.errors import AdagError
from adag.llm.backend import Backend, Completion
from adag.llm.roles import Messages, UnusableReply
from adag.llm.sdk import sdk_errors


class OpenAIBackend(Backend):
    kind = "openai"

    def __init__(self, model: str, base_url: str | None = None, api_key_env: str = "OPENAI_API_KEY"):
        super().__init__(model, base_url)
        import openai

        key = os.environ.get(api_key_env)
        if key is None and base_url is None:
            raise AdagError(f"the openai backend needs an API key: set {api_key_env}, or give a local server "
                            "as openai:MODEL@http://127.0.0.1:PORT/v1")
        self.sdk = openai
        self.client = openai.OpenAI(api_key=key or "not-needed", base_url=base_url, max_retries=0)

    def complete(self, messages: Messages, temperature: float, max_tokens: int, logprobs: bool, seed: int,
                 timeout: float) -> Completion:
        extra = {"logprobs": True, "top_logprobs": 20} if logprobs else {}
        with sdk_errors(self.sdk, self.name):
            reply = self.client.chat.completions.create(model=self.model, messages=messages, temperature=temperature,
                                                        max_tokens=max_tokens, timeout=timeout, **extra)
        if not reply.choices:
            raise UnusableReply(f"{self.name} sent a reply without choices")
        choice = reply.choices[0]
        top = None
        content = getattr(choice.logprobs, "content", None) if choice.logprobs else None
        if content:
            top = [{alt.token: alt.logprob for alt in (item.top_logprobs or [])} | {item.token: item.logprob}
                   for item in content]
        usage = reply.usage
        return Completion(choice.message.content or "", getattr(usage, "prompt_tokens", 0) or 0,
                          getattr(usage, "completion_tokens", 0) or 0, top)
