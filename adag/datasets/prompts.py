"""How a prompt row becomes the text a model reads and its token ids: chat templates, the base template
for models without one, and single-token labels."""

from __future__ import annotations

import string
from typing import Any, Literal

from adag.datasets.schema import PromptRow
from adag.errors import AdagError

PromptFormat = Literal["auto", "chat", "plain"]
# How a row reads for a model without a chat template (or under --prompt-format plain): the built-in
# datasets' seed "Answer:" makes "What is the capital of France? Answer:".
DEFAULT_BASE_TEMPLATE = "{prompt} {seed_response}"
TEMPLATE_FIELDS = {"prompt", "seed_response"}


def check_base_template(template: str) -> str:
    """A base template must place {prompt} and may place {seed_response}; nothing else."""
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as error:
        raise ValueError(f"base template {template!r} is not a valid format string ({error}); "
                         "write literal braces as {{ and }}") from None
    if "prompt" not in fields or not fields <= TEMPLATE_FIELDS:
        raise ValueError(f"base template {template!r} must contain {{prompt}} and may contain {{seed_response}}, "
                         f"no other fields (found {', '.join(sorted(fields)) or 'none'})")
    return template


def uses_chat_template(tokenizer: Any, prompt_format: PromptFormat = "auto") -> bool:
    """Whether prompts go through the tokenizer's chat template: with `auto`, whenever it has one."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if prompt_format == "chat" and not has_template:
        raise AdagError("--prompt-format chat: this model's tokenizer has no chat template (a base model); "
                        "use --prompt-format auto or plain")
    return has_template if prompt_format == "auto" else prompt_format == "chat"


def format_prompt(tokenizer: Any, row: PromptRow, prompt_format: PromptFormat = "auto",
                  base_template: str = DEFAULT_BASE_TEMPLATE) -> str:
    """The exact text traced: the chat template plus the seed response for chat models, `base_template`
    filled with the row for base models (or under `prompt_format="plain"`)."""
    if uses_chat_template(tokenizer, prompt_format):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": row.prompt}], tokenize=False, add_generation_prompt=True
        )
        return text + row.seed_response
    return base_template.format(prompt=row.prompt, seed_response=row.seed_response).strip()


def encode_prompt(tokenizer: Any, row: PromptRow, prompt_format: PromptFormat = "auto",
                  base_template: str = DEFAULT_BASE_TEMPLATE) -> list[int]:
    """Token ids of the formatted prompt."""
    return encode_text(tokenizer, format_prompt(tokenizer, row, prompt_format, base_template),
                       uses_chat_template(tokenizer, prompt_format))


def format_messages(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """A conversation as a chat model reads it (its template), or for a base model as a plain transcript
    that ends where the assistant's reply begins."""
    if uses_chat_template(tokenizer):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    speaker = {"user": "User: ", "assistant": "Assistant: "}
    turns = [speaker.get(message["role"], "") + message["content"] for message in messages]
    return "\n\n".join([*turns, "Assistant:"])


def encode_text(tokenizer: Any, text: str, chat: bool) -> list[int]:
    """Token ids of formatted text. Chat templates carry their own special tokens; plain text gets the
    tokenizer's (e.g. a beginning-of-sequence token)."""
    return tokenizer(text, add_special_tokens=not chat)["input_ids"]


def label_token_ids(tokenizer: Any, row: PromptRow, row_index: int) -> list[int]:
    """The token id of each label, which must be exactly one token for this tokenizer."""
    ids = []
    for label in row.labels:
        pieces = tokenizer(label, add_special_tokens=False)["input_ids"]
        if len(pieces) != 1:
            shown = [tokenizer.decode([p]) for p in pieces]
            raise AdagError(
                f"row {row_index}: label {label!r} is {len(pieces)} tokens {shown} for this tokenizer, "
                "not one; use a single-token label (often with a leading space, e.g. ' Paris')"
            )
        ids.append(pieces[0])
    return ids
