"""Toy models for tests and benchmarks: a byte-level BPE tokenizer trained in-process and a model
of any supported family built from a config with random weights (no download).

May import: transformers, torch, `models.settings`, `models.loading` (`LoadedModel`).
"""

from __future__ import annotations

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    PreTrainedTokenizerFast,
)

from mka_exp.models.loading import LoadedModel
from mka_exp.models.settings import resolve_device, resolve_dtype

TOY_CORPUS = (
    "The quick brown fox jumps over the lazy dog. Question: Answer: A. B. C. D. "
    "yes no true false the of and to in is was for on that with as by at from "
    "0123456789 .,;:!?'\"()[]{}-+*/=<>@#$%^&_|~` abcdefghijklmnopqrstuvwxyz "
    "ABCDEFGHIJKLMNOPQRSTUVWXYZ\n"
)


def train_tokenizer(vocab_size: int = 384, corpus: str = TOY_CORPUS) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained in-process: any text encodes, no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<unk>", "<s>", "</s>", "<pad>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([corpus] * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
    )


def build_random_model(
    model_type: str = "llama",
    num_layers: int = 4,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    max_position_embeddings: int = 2048,
    seed: int = 0,
    dtype: str = "auto",
    device: str = "auto",
    name: str | None = None,
) -> LoadedModel:
    """A model of any supported family built from a config with random weights."""
    tokenizer = train_tokenizer()
    config = AutoConfig.for_model(
        model_type,
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=hidden_size // num_heads,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    device = resolve_device(device)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=resolve_dtype(dtype, device))
    model.to(device).eval()
    return LoadedModel(
        model, tokenizer, name or f"random_{model_type}_{num_layers}l_{hidden_size}h"
    )
