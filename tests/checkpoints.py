"""Tiny Hugging Face checkpoints, built with transformers itself, for exactness tests.

The reference model object is kept next to its directory so tests can compare
teeshard's split pipeline against the unsplit Hugging Face implementation.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from teeshard.model.random_checkpoint import train_tokenizer, write_tokenizer

FAMILY_OPTIONS: dict[str, dict[str, Any]] = {
    "llama": {},
    "qwen2": {},  # q/k/v biases on by default
    "mistral": {"sliding_window": 16},
}


@dataclass
class TinyModel:
    family: str
    path: Path
    reference: Any  # the transformers model, eval mode, float32
    num_layers: int


def build_tiny_model(
    family: str,
    out: Path,
    num_layers: int = 4,
    max_positions: int = 256,
    seed: int = 0,
    **overrides: Any,
) -> TinyModel:
    import transformers

    config_class = {
        "llama": transformers.LlamaConfig,
        "qwen2": transformers.Qwen2Config,
        "mistral": transformers.MistralConfig,
    }[family]
    model_class = {
        "llama": transformers.LlamaForCausalLM,
        "qwen2": transformers.Qwen2ForCausalLM,
        "mistral": transformers.MistralForCausalLM,
    }[family]
    tokenizer = train_tokenizer(vocab_size=512)
    options = {**FAMILY_OPTIONS[family], **overrides}
    config = config_class(
        vocab_size=tokenizer.get_vocab_size(),
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        bos_token_id=0,
        eos_token_id=1,
        tie_word_embeddings=False,
        **options,
    )
    torch.manual_seed(seed)
    model = model_class(config).eval()
    # Random init leaves norms at 1 and biases at 0; perturb them so they are really tested.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                param.add_(torch.randn_like(param) * 0.1)
    model.save_pretrained(out)
    write_tokenizer(tokenizer, out)
    return TinyModel(family, out, model, num_layers)
