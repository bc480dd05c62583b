"""Prompt datasets: built-ins, JSONL and CSV files, and how rows become token ids.

Modules: `schema` (what a row is and the checks every row passes), `files` (reading JSONL and CSV),
`catalog` (the built-in datasets and `load_dataset`), `prompts` (templating and tokenisation).
"""

from adag.datasets.catalog import BUILTIN_DATASETS, load_dataset
from adag.datasets.prompts import (
    DEFAULT_BASE_TEMPLATE,
    PromptFormat,
    check_base_template,
    encode_prompt,
    encode_text,
    format_messages,
    format_prompt,
    label_token_ids,
    uses_chat_template,
)
from adag.datasets.schema import Dataset, PromptRow

__all__ = ["BUILTIN_DATASETS", "DEFAULT_BASE_TEMPLATE", "Dataset", "PromptFormat", "PromptRow", "check_base_template",
           "encode_prompt", "encode_text", "format_messages", "format_prompt", "label_token_ids", "load_dataset",
           "uses_chat_template"]
