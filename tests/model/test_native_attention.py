"""The native decode attention (``native/attention.c``): every single-step segment of a
batch in one call. It must write each session's key and value exactly where torch's
path writes them, compute what ``one_query_attention`` computes (float32 arithmetic,
within rounding), give a session the same bits whatever its batch-mates, honour
sliding windows, leave prefill segments to torch, and refuse what it cannot take."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from teeshard.model import native
from teeshard.model.checkpoint import Checkpoint
from teeshard.model.layer_range import LayerRange
from teeshard.model.loader import load_shard
from teeshard.model.native.attention import DecodeSessions, decode_attention, supports
from teeshard.model.transformer import ATTENTION_ENV, KVCache, one_query_attention
from tests.checkpoints import TinyModel

pytestmark = pytest.mark.skipif(
    not supports(torch.float32, torch.device("cpu"), 64),
    reason=f"no native kernel here: {native.unavailable_reason()}",
)

LAYERS, HEADS, KV_HEADS, HEAD_DIM = 3, 8, 2, 64


def cache_with(length: int, max_len: int, dtype: torch.dtype, seed: int) -> KVCache:
    """A cache of ``max_len`` positions whose first ``length`` are filled at random."""
    cache = KVCache.allocate(LAYERS, KV_HEADS, max_len, HEAD_DIM, dtype, torch.device("cpu"))
    generator = torch.Generator().manual_seed(seed)
    cache.keys.copy_(torch.randn(cache.keys.shape, generator=generator))
    cache.values.copy_(torch.randn(cache.values.shape, generator=generator))
    cache.length = length
    return cache


def new_rows(rows: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, ...]:
    """q (1, N, H, D), k and v (1, N, Hkv, D); q and k as adjacent heads of one tensor,
    as the fused projection makes them (row strides wider than the heads)."""
    generator = torch.Generator().manual_seed(seed)
    qk = torch.randn(1, rows, HEADS + KV_HEADS, HEAD_DIM, generator=generator).to(dtype)
    v = torch.randn(1, rows, KV_HEADS, HEAD_DIM, generator=generator).to(dtype)
    return qk[:, :, :HEADS], qk[:, :, HEADS:], v


def torch_reference(
    cache: KVCache, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int
) -> torch.Tensor:
    """What transformer.py computes for one decoding row without the kernel: (H, D)."""
    start = cache.length
    cache.keys[layer, :, :, start] = k[0]
    cache.values[layer, :, :, start] = v[0]
    end = start + 1
    first = end - window if window and end > window else 0
    keys = cache.keys[layer, :, :, first:end]
    values = cache.values[layer, :, :, first:end]
    out = one_query_attention(q[None].transpose(1, 2), keys, values)  # (1, H, 1, D)
    return out[0, :, 0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [0, 5])
def test_a_batch_matches_torch_and_writes_the_caches(dtype: torch.dtype, window: int) -> None:
    lengths, max_lens = [0, 3, 17, 40], [8, 9, 64, 41]  # an empty cache; one filled to its end
    pairs = enumerate(zip(lengths, max_lens, strict=True))
    caches = [cache_with(n, m, dtype, seed) for seed, (n, m) in pairs]
    twins = [KVCache(c.keys.clone(), c.values.clone(), c.length) for c in caches]
    q, k, v = new_rows(len(caches), dtype, seed=9)
    sessions = DecodeSessions.of(caches, [1] * len(caches), lengths)
    assert sessions is not None and sessions.segments == frozenset(range(len(caches)))
    out = torch.full((1, len(caches), HEADS, HEAD_DIM), float("nan"), dtype=dtype)
    decode_attention(sessions, 1, q, k, v, out, window)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    for row, twin in enumerate(twins):
        want = torch_reference(twin, 1, q[:, row], k[:, row], v[:, row], window)
        assert (out[0, row].float() - want.float()).abs().max().item() < tolerance, row
        # the new key and value written where torch writes them, and nothing else touched
        assert torch.equal(caches[row].keys, twin.keys) and torch.equal(
            caches[row].values, twin.values
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_each_session_is_bit_for_bit_what_it_is_alone(dtype: torch.dtype) -> None:
    lengths = [5, 30, 2, 11, 64]

    def run(indices: list[int]) -> torch.Tensor:
        caches = [cache_with(lengths[i], 80, dtype, seed=i) for i in indices]
        q, k, v = (t[:, indices] for t in new_rows(len(lengths), dtype, seed=3))
        sessions = DecodeSessions.of(caches, [1] * len(indices), [lengths[i] for i in indices])
        assert sessions is not None
        out = torch.empty(1, len(indices), HEADS, HEAD_DIM, dtype=dtype)
        decode_attention(sessions, 2, q.contiguous(), k, v, out, None)
        return out[0]

    alone = torch.stack([run([i])[0] for i in range(len(lengths))])
    assert torch.equal(run(list(range(len(lengths)))), alone)
    assert torch.equal(run([4, 0, 2]), alone[[4, 0, 2]])


def test_prefill_segments_are_left_to_torch() -> None:
    caches = [cache_with(n, 32, torch.float32, seed=n) for n in (4, 0, 9)]
    sessions = DecodeSessions.of(caches, [1, 6, 1], [4, 0, 9])
    assert sessions is not None
    assert sessions.segments == frozenset({0, 2})
    assert sessions.rows.tolist() == [0, 7]  # rows of the packed batch: 1 + 6 before the third
    out = torch.full((1, 8, HEADS, HEAD_DIM), -7.0)
    q, k, v = new_rows(8, torch.float32, seed=1)
    decode_attention(sessions, 0, q, k, v, out, None)
    assert bool((out[0, 1:7] == -7.0).all())  # the prefill rows untouched
    assert not bool((out[0, [0, 7]] == -7.0).any())
    assert DecodeSessions.of(caches[1:2], [6], [0]) is None  # nothing to decode


def test_what_the_kernel_cannot_take_is_refused() -> None:
    assert not supports(torch.float16, torch.device("cpu"), 64)  # torch's path for float16
    assert not supports(torch.float32, torch.device("cpu"), 60)  # head size not a multiple of 8
    assert not supports(torch.float32, torch.device("meta"), 64)
    caches = [cache_with(3, 8, torch.float32, seed=0)]
    sessions = DecodeSessions.of(caches, [1], [3])
    assert sessions is not None
    q, k, v = new_rows(1, torch.float32, seed=0)
    wide = torch.empty(1, 1, HEADS, 2 * HEAD_DIM)[..., :HEAD_DIM]
    with pytest.raises(native.NativeKernelError, match="does not take"):
        decode_attention(sessions, 0, q, k, v, wide, None)
    with pytest.raises(native.NativeKernelError, match="does not take"):
        decode_attention(sessions, 0, q, k, v.double(), torch.empty(1, 1, HEADS, HEAD_DIM), None)
    full = [cache_with(8, 8, torch.float32, seed=0)]  # no room: refused, memory untouched
    sessions = DecodeSessions.of(full, [1], [8])
    assert sessions is not None
    with pytest.raises(native.NativeKernelError, match="refused"):
        decode_attention(sessions, 0, q, k, v, torch.empty(1, 1, HEADS, HEAD_DIM), None)


def test_what_would_write_outside_a_cache_is_refused() -> None:
    """The kernel writes into each cache by the numbers it is given: a layer past the
    slab, rows of another dtype (4-byte values into a 2-byte slab), other head counts
    or another batch's rows must be refused before it runs, with the caches untouched."""
    caches = [cache_with(3, 8, torch.bfloat16, seed=0), cache_with(5, 8, torch.bfloat16, seed=1)]
    before = [(c.keys.clone(), c.values.clone()) for c in caches]
    sessions = DecodeSessions.of(caches, [1, 1], [3, 5])
    assert sessions is not None
    q, k, v = new_rows(2, torch.bfloat16, seed=0)
    out = torch.empty(1, 2, HEADS, HEAD_DIM, dtype=torch.bfloat16)
    with pytest.raises(native.NativeKernelError, match=f"layer {LAYERS} of caches holding"):
        decode_attention(sessions, LAYERS, q, k, v, out, None)
    with pytest.raises(native.NativeKernelError, match="layer -1"):
        decode_attention(sessions, -1, q, k, v, out, None)
    wide = [t.float() for t in (q, k, v, out)]
    with pytest.raises(native.NativeKernelError, match="does not take"):
        decode_attention(sessions, 0, *wide[:3], wide[3].contiguous(), None)
    q3, k3, v3 = new_rows(3, torch.bfloat16, seed=0)  # a third row the batch does not have
    with pytest.raises(native.NativeKernelError, match="does not take"):
        decode_attention(
            sessions, 0, q3, k3, v3, torch.empty_like(out[:, :1]).repeat(1, 3, 1, 1), None
        )
    one_kv = (k[:, :, :1], v[:, :, :1])  # one key/value head where the caches hold two
    with pytest.raises(native.NativeKernelError, match="does not take"):
        decode_attention(sessions, 0, q[:, :, :4], *one_kv, out[:, :, :4].contiguous(), None)
    for cache, (keys, values) in zip(caches, before, strict=True):
        assert torch.equal(cache.keys, keys) and torch.equal(cache.values, values)


def test_caches_unlike_the_first_are_left_to_torch() -> None:
    """A cache with other layers, heads, head size or dtype than the batch's first is
    not given to the kernel (it would be written by the first's numbers)."""
    first = cache_with(2, 8, torch.float32, seed=0)
    fewer_layers = KVCache.allocate(
        LAYERS - 1, KV_HEADS, 8, HEAD_DIM, torch.float32, first.keys.device
    )
    other_dtype = cache_with(2, 8, torch.bfloat16, seed=1)
    sessions = DecodeSessions.of([first, fewer_layers, other_dtype], [1, 1, 1], [2, 0, 2])
    assert sessions is not None and sessions.segments == frozenset({0})
    assert (sessions.layers, sessions.kv_heads, sessions.head_dim) == (LAYERS, KV_HEADS, HEAD_DIM)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_shard_decodes_the_same_tokens_either_way(
    tiny_model: TinyModel, dtype: torch.dtype
) -> None:
    """Whole shards, several sessions decoding in one batch after prompts of different
    lengths: logits agree with torch's per-session path within float32 rounding
    (bfloat16: its caches' rounding), and greedy tokens are the same."""
    checkpoint, layers = Checkpoint(tiny_model.path), LayerRange(0, tiny_model.num_layers)
    fast, slow = (load_shard(checkpoint, layers, dtype) for _ in range(2))
    slow.native_attention = False
    prompts = [[3, 17, 250], [5, 6, 7, 8, 9, 10, 11], [42]]
    tolerance = 1e-4 if dtype == torch.float32 else 3e-2
    with torch.no_grad():
        results = []
        for shard in (fast, slow):
            caches = [shard.new_cache(32) for _ in prompts]
            hiddens = [shard.embed(torch.tensor([p])) for p in prompts]
            logits = shard.forward_batch(hiddens, caches)
            steps = [torch.cat(logits)]
            for _ in range(12):
                tokens = torch.cat(logits).argmax(dim=-1)
                hiddens = [shard.embed(t.view(1, 1)) for t in tokens]
                logits = shard.forward_batch(hiddens, caches)
                steps.append(torch.cat(logits))
            results.append(torch.stack(steps))
    assert (results[0] - results[1]).abs().max().item() < tolerance
    assert torch.equal(results[0].argmax(dim=-1), results[1].argmax(dim=-1))


def test_the_attention_choice_is_checked(
    tiny_llama: TinyModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    checkpoint, layers = Checkpoint(tiny_llama.path), LayerRange(0, 1)
    assert load_shard(checkpoint, layers).native_attention
    monkeypatch.setenv(ATTENTION_ENV, "torch")
    assert not load_shard(checkpoint, layers).native_attention
    monkeypatch.setenv(ATTENTION_ENV, "fused")
    with pytest.raises(ValueError, match="choose native or torch"):
        load_shard(checkpoint, layers)


def test_without_a_working_compiler_torch_serves(tiny_llama: TinyModel) -> None:
    """A compiler that fails leaves no native kernel (and says why); a shard then loads
    with torch's attention and decodes. A fresh process: the build is cached per process."""
    script = (
        "import sys, torch\n"
        "from teeshard.model import native\n"
        "from teeshard.model.checkpoint import Checkpoint\n"
        "from teeshard.model.layer_range import LayerRange\n"
        "from teeshard.model.loader import load_shard\n"
        "assert not native.available()\n"
        "assert 'building the native kernels failed' in native.unavailable_reason()\n"
        "shard = load_shard(Checkpoint(sys.argv[1]), LayerRange(0, 4))\n"
        "assert not shard.native_attention\n"
        "cache = shard.new_cache(8)\n"
        "shard(shard.embed(torch.tensor([[3, 17]])), cache)\n"
        "print(shard(shard.embed(torch.tensor([[5]])), cache).shape)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(tiny_llama.path)],
        env={**os.environ, "CC": "false"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == f"torch.Size([1, {tiny_llama.reference.config.vocab_size}])"
