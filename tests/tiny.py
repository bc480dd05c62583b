"""Tiny random models of every supported family, with a tokenizer trained offline in milliseconds."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

from adag.datasets.builtin import ANTONYMS, COUNTRY_CAPITALS, STATE_CITIES
from adag.models import FamilyAdapter, LoadedModel, adapter_for

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL = ["<pad>", "<|im_start|>", "<|im_end|>"]


def offline_tokenizer(vocab_size: int = 384) -> PreTrainedTokenizerFast:
    corpus = [f"What is the capital of {c}? Answer: {a}" for c, a in COUNTRY_CAPITALS.items()]
    corpus += [f"the state containing {city} {state} {cap}" for state, (city, cap) in STATE_CITIES.items()]
    corpus += [f"What is the opposite of \"{w}\"? {o}" for w, o in ANTONYMS.items()]
    corpus += [f"What is {x} + {y}? {x + y}" for x in range(0, 100, 7) for y in range(0, 100, 11)]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator(corpus, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<|im_start|>", eos_token="<|im_end|>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _common(vocab: int) -> dict:
    return dict(vocab_size=vocab, hidden_size=48, intermediate_size=96, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                initializer_range=0.3, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def tiny_config(family: str, vocab: int):
    common = _common(vocab)
    if family == "llama":
        return LlamaConfig(**common)
    if family == "mistral":
        return MistralConfig(**common, sliding_window=None)
    if family == "qwen2":
        return Qwen2Config(**common, use_sliding_window=False)
    if family == "qwen3":
        return Qwen3Config(**common, head_dim=12, use_sliding_window=False)
    if family == "gemma2":
        return Gemma2Config(**common, head_dim=12, query_pre_attn_scalar=12, sliding_window=8,
                            final_logit_softcapping=3.0, attn_logit_softcapping=5.0)
    if family == "gemma3":
        return Gemma3TextConfig(**common, head_dim=12, query_pre_attn_scalar=12, sliding_window=8)
    if family == "gpt2":
        return GPT2Config(vocab_size=vocab, n_embd=48, n_layer=3, n_head=4, n_positions=256,
                          initializer_range=0.3, bos_token_id=1, eos_token_id=2)
    raise KeyError(family)


FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "gpt2"]


def tiny_model(family: str, tokenizer: PreTrainedTokenizerFast | None = None, seed: int = 0) -> LoadedModel:
    tokenizer = tokenizer or offline_tokenizer()
    torch.manual_seed(seed)
    config = tiny_config(family, len(tokenizer))
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.eval().requires_grad_(False)
    # Random biases (zero at init) so that bias shares are exercised where a family has biases.
    for name, param in model.named_parameters():
        if name.endswith("bias"):
            param.data.normal_(0, 0.1)
    adapter: FamilyAdapter = adapter_for(config.model_type)
    return LoadedModel(f"tiny-{family}", model, tokenizer, adapter, f"tiny-{family}-{seed}")


def in_float64(lm: LoadedModel) -> LoadedModel:
    """Convert a tiny model to float64 in place, so that comparisons with a slow reference test the
    method rather than rounding.

    Eager attention (Gemma 2's, which soft-caps attention scores) builds its additive mask with
    finfo(float64).min and then runs the softmax in float32, where that value becomes -inf. With
    left padding, a padded query position has every key masked, so its softmax is NaN; the next
    layer multiplies those NaN values by exactly-zero attention weights (0 * NaN = NaN) and every
    position is lost. In float32 the same row is a harmless uniform distribution that no real
    position reads. Clamping the mask to finfo(float32).min before each layer restores exactly
    that: the weights of real positions are unchanged (exp of the masked scores is 0 either way).
    No dtype that adag loads is affected (bf16 and fp16 minima stay finite in float32), so this
    belongs to the float64 test models, not to adag.
    """
    lm.model.double()
    floor = torch.finfo(torch.float32).min

    def finite_mask(_module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.is_floating_point():
            kwargs = {**kwargs, "attention_mask": mask.clamp_min(floor)}
        return args, kwargs

    for layer in lm.adapter.layer_list(lm.model):
        layer.register_forward_pre_hook(finite_mask, with_kwargs=True)
    return lm
