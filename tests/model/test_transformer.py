"""Shard numerics against Hugging Face, including paths the pipeline tests do not reach."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from teeshard.model.checkpoint import Checkpoint
from teeshard.model.layer_range import LayerRange
from teeshard.model.loader import load_shard
from teeshard.model.transformer import CacheFullError, one_query_attention
from tests.checkpoints import build_tiny_model

IDS = torch.tensor(
    [[3, 17, 250, 33, 101, 7, 402, 99, 5, 311, 64, 12, 8, 200, 41, 77, 19, 23, 400, 6]]
)


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_chunked_prefill_and_decode_match_full_forward(family: str, tmp_path: Path) -> None:
    """Prefill in two chunks, then decode one by one: every position's logits match HF.

    With Mistral's sliding window of 16 and 20 positions, the window really cuts.
    """
    model = build_tiny_model(family, tmp_path)
    shard = load_shard(Checkpoint(model.path), LayerRange(0, model.num_layers))
    cache = shard.new_cache(32)
    with torch.no_grad():
        reference = model.reference(IDS).logits[0]  # (T, vocab)
        ours = [
            shard(shard.embed(IDS[:, :7]), cache)[0],
            shard(shard.embed(IDS[:, 7:10]), cache)[0],
        ]
        for position in range(10, IDS.shape[1]):
            ours.append(shard(shard.embed(IDS[:, position : position + 1]), cache)[0])
    expected = [reference[6], reference[9], *reference[10:]]
    for got, want in zip(ours, expected, strict=True):
        assert (got - want).abs().max().item() < 1e-4


def test_cache_refuses_to_overflow(tmp_path: Path) -> None:
    model = build_tiny_model("llama", tmp_path)
    shard = load_shard(Checkpoint(model.path), LayerRange(0, 2))
    cache = shard.new_cache(8)
    with torch.no_grad():
        shard(shard.embed(IDS[:, :6]), cache)
        with pytest.raises(CacheFullError):
            shard(shard.embed(IDS[:, 6:9]), cache)
    assert cache.length == 6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("heads", "kv_heads"), [(8, 2), (4, 4)])
def test_one_query_attention_equals_sdpa(dtype: torch.dtype, heads: int, kv_heads: int) -> None:
    """The decode path's own attention (one query, float32 softmax) against SDPA in
    float32, on keys read from a larger cache slab as the cache holds them."""
    generator = torch.Generator().manual_seed(5)
    q = torch.randn(1, heads, 1, 16, generator=generator).to(dtype)
    slab = torch.randn(2, 1, kv_heads, 40, 16, generator=generator).to(dtype)
    keys, values = slab[0, :, :, :29], slab[1, :, :, :29]  # strided views, as the cache gives
    got = one_query_attention(q, keys, values)
    want = torch.nn.functional.scaled_dot_product_attention(
        q.float(), keys.float(), values.float(), enable_gqa=heads != kv_heads
    )
    assert got.dtype == dtype and got.shape == (1, heads, 1, 16)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2  # bfloat16: the output's rounding
    assert (got.float() - want).abs().max().item() < tolerance
