"""Shared constants and builders for the attestation tests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from teeshard.attest.attester import NodeAttestation
from teeshard.attest.manifest import ShardManifest

DATA = Path(__file__).parent / "data"
# At this time both good samples' collateral is valid (issued 2025-06-19, next update 2025-07-19).
VECTOR_TIME = 1751000000


def build_llama(path: Path, dtype: torch.dtype = torch.float32, layers: int = 3) -> Path:
    """A tiny randomly initialised Llama saved as safetensors by transformers."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
        tie_word_embeddings=False,
    )  # fmt: skip
    model = LlamaForCausalLM(config).to(dtype)
    model.save_pretrained(path)
    return path


NodeFactory = Callable[[ShardManifest], NodeAttestation]
