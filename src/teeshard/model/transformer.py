"""The transformer blocks of a Llama-family decoder, as one shard of layers.

Read top to bottom: the per-session KV cache, norm, rotary embedding, attention,
MLP, block, then the ``Shard`` that strings blocks together. A shard optionally owns the token
embedding (first shard) and the final norm plus LM head (last shard); nothing
here knows about networks or other nodes. Numerics follow Hugging Face's
implementation so that a split model reproduces the unsplit one.

Number formats (:mod:`teeshard.model.formats`) change only the linears (the LM
head included), the embedding and the KV cache; the residual stream between
blocks, the norms, the rotary embedding, attention's softmax and the logits a
shard returns stay float32 in every format, so the hidden states a shard takes
and returns are float32.
"""

from __future__ import annotations

import itertools
import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from teeshard.model.formats import NumberFormat
from teeshard.model.layer_range import LayerRange
from teeshard.model.native import block_ops
from teeshard.model.native.attention import DecodeSessions, decode_attention
from teeshard.model.spec import ArchSpec, RopeSpec

# -- the per-session KV cache, preallocated --------------------------------------------


class CacheFullError(ValueError):
    """A step would write past the session's maximum length."""


@dataclass
class KVCache:
    keys: torch.Tensor  # (L, B, Hkv, S, D): one slab so a session is one allocation
    values: torch.Tensor
    length: int = 0  # positions filled so far

    @classmethod
    def allocate(
        cls,
        num_layers: int,
        num_kv_heads: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> KVCache:
        shape = (num_layers, 1, num_kv_heads, max_len, head_dim)
        # torch.empty touches no pages: memory grows with the tokens actually cached.
        return cls(
            torch.empty(shape, dtype=dtype, device=device),
            torch.empty(shape, dtype=dtype, device=device),
        )

    @property
    def max_len(self) -> int:
        return self.keys.shape[3]

    def check_room(self, steps: int) -> None:
        if self.length + steps > self.max_len:
            raise CacheFullError(
                f"session holds {self.length} of {self.max_len} positions; {steps} more do not fit"
            )

    def advance(self, steps: int) -> None:
        self.length += steps


# -- blocks -------------------------------------------------------------------------

ATTENTION_ENV = "TEESHARD_DECODE_ATTENTION"  # native (the default) or torch, to compare
# native (the default): norms, rotary and SwiGLU in one call each (native/block_ops.py);
# torch: torch's operators, to compare
BLOCK_OPS_ENV = "TEESHARD_BLOCK_OPS"


def _wanted(env: str) -> str:
    wanted = os.environ.get(env, "native")
    if wanted not in ("native", "torch"):
        raise ValueError(f"{env}={wanted!r}: choose native or torch")
    return wanted


class RMSNorm(nn.Module):
    native_ops = True  # one native call where it runs (Shard sets it per $TEESHARD_BLOCK_OPS)

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))  # float32 in every number format

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.native_ops:
            normed = block_ops.rms_norm(x, self.weight, self.eps)
            if normed is not None:
                return normed
        x32 = x.float()  # normalise in float32, whatever the number format
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight.float() * x32  # float32; each linear casts to its own dtype


class Linear(nn.Linear):
    """``nn.Linear`` that casts its input to its weight's dtype (a no-op in float32)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(self.weight.dtype), self.weight, self.bias)


def rope_inv_freq(rope: RopeSpec, head_dim: int) -> torch.Tensor:
    # Built on the CPU explicitly: shards are constructed under the meta device.
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
    inv_freq = 1.0 / (rope.theta**exponents)
    if rope.rope_type == "linear":
        return inv_freq / rope.factor
    if rope.rope_type == "llama3":
        # Llama 3.1 frequency-dependent scaling, as in transformers' _compute_llama3_parameters.
        old_len = rope.original_max_position_embeddings
        low_wavelen = old_len / rope.low_freq_factor
        high_wavelen = old_len / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (old_len / wavelen - rope.low_freq_factor) / (
            rope.high_freq_factor - rope.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        is_medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return torch.where(is_medium, smoothed, scaled)
    return inv_freq


class RotaryTable:
    """cos/sin for every position up to a maximum, grown on demand (float32 always)."""

    def __init__(self, rope: RopeSpec, head_dim: int) -> None:
        self.inv_freq = rope_inv_freq(rope, head_dim)  # (D/2,)
        self.cos = torch.empty(0)
        self.sin = torch.empty(0)

    def get(
        self, start: int, length: int, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        end = start + length
        if self.cos.shape[0] < end or self.cos.device != device:
            size = max(end, 2 * self.cos.shape[0], 256)
            positions = torch.arange(size, dtype=torch.float32, device="cpu")
            freqs = torch.outer(positions, self.inv_freq)  # (P, D/2)
            emb = torch.cat((freqs, freqs), dim=-1)  # (P, D)
            self.cos = emb.cos().to(device=device)
            self.sin = emb.sin().to(device=device)
        return self.cos[start:end], self.sin[start:end]  # (T, D) each


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin  # x: (B, T, H, D); cos/sin broadcast from (T, 1, D)


def one_query_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """One decoding query per head against its keys: two small products and a float32
    softmax. ``q`` (1, H, 1, D); ``keys``/``values`` (1, Hkv, S, D), H a multiple of Hkv.

    The query heads that share a key/value head form one matrix, so each key is read
    once. On this CPU this is several times faster than SDPA for a single query (about
    9x in bfloat16, whose flash kernel has no one-row path; 1.6x in float32).
    """
    heads, head_dim = q.shape[1], q.shape[3]
    kv_heads = keys.shape[1]
    grouped = q.float().view(1, kv_heads, heads // kv_heads, head_dim)  # head h: kv h // G
    scores = torch.matmul(grouped, keys.float().transpose(-1, -2))  # (1, Hkv, G, S)
    probs = torch.softmax(scores.mul_(head_dim**-0.5), dim=-1)
    out = torch.matmul(probs, values.float())  # (1, Hkv, G, D)
    return out.view(1, heads, 1, head_dim).to(q.dtype)


@dataclass(frozen=True)
class Pack:
    """Several sessions' steps packed along the token axis, for one batched forward.

    Segment ``i`` is ``steps[i]`` consecutive rows of the packed activations
    (1, sum(steps), C); it writes its session's cache from position ``starts[i]``.
    The linears and norms run once over every row; rotary and attention run per
    segment, each against its own cache, so sessions never see each other.
    """

    caches: tuple[KVCache, ...]
    steps: tuple[int, ...]
    starts: tuple[int, ...]
    cos: torch.Tensor  # (sum(steps), 1, D): each row's position (broadcast over heads), float32
    sin: torch.Tensor
    # the single-step segments, where the native decode attention takes them
    decoding: DecodeSessions | None = None


class Attention(nn.Module):
    native_ops = True  # rotary in one native call where it runs (as RMSNorm's)

    def __init__(self, spec: ArchSpec) -> None:
        super().__init__()
        self.num_heads = spec.num_heads
        self.num_kv_heads = spec.num_kv_heads
        self.head_dim = spec.head_dim
        self.sliding_window = spec.sliding_window
        bias = spec.attention_bias
        self.q_proj = Linear(spec.hidden_size, spec.num_heads * spec.head_dim, bias=bias)
        self.k_proj = Linear(spec.hidden_size, spec.kv_dim, bias=bias)
        self.v_proj = Linear(spec.hidden_size, spec.kv_dim, bias=bias)
        self.o_proj = Linear(spec.num_heads * spec.head_dim, spec.hidden_size, bias=False)
        # q, k and v stacked into one product, where the number format fused them
        # (:func:`teeshard.model.formats.fuse_projections`); then q/k/v_proj are gone
        self.qkv_proj: nn.Module | None = None

    def forward(self, x: torch.Tensor, pack: Pack, layer: int) -> torch.Tensor:
        """``x`` (1, N, C) float32, the packed rows of every segment; ``layer``: the
        index of this block in the shard, i.e. in each cache's slab."""
        rows = x.shape[1]
        heads, kv_heads, head_dim = self.num_heads, self.num_kv_heads, self.head_dim
        dtype = pack.caches[0].keys.dtype  # rotary in float32, then attention in the compute dtype
        if self.qkv_proj is not None:
            qkv = self.qkv_proj(x).view(1, rows, heads + 2 * kv_heads, head_dim)
            # q and k are adjacent heads of one tensor: one rotary pass turns both
            qk = self._rotated(qkv[:, :, : heads + kv_heads], pack, dtype)
            q, k = qk[:, :, :heads], qk[:, :, heads:]  # (1, N, H, D), (1, N, Hkv, D)
            v = qkv[:, :, heads + kv_heads :]
        else:
            q = self.q_proj(x).view(1, rows, heads, head_dim)
            k = self.k_proj(x).view(1, rows, kv_heads, head_dim)
            v = self.v_proj(x).view(1, rows, kv_heads, head_dim)
            q, k = self._rotated(q, pack, dtype), self._rotated(k, pack, dtype)
        if v.dtype != dtype:
            v = v.to(dtype)
        out = torch.empty(1, rows, heads, head_dim, dtype=dtype, device=x.device)
        decoding = pack.decoding
        if decoding is not None:  # every single-step segment in one native call
            decode_attention(decoding, layer, q, k, v, out, self.sliding_window)
            if len(decoding.segments) == len(pack.steps):
                return self.o_proj(out.view(1, rows, heads * head_dim))
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        offset = 0
        for index, (cache, steps, start) in enumerate(
            zip(pack.caches, pack.steps, pack.starts, strict=True)
        ):
            rows_of = slice(offset, offset + steps)
            offset += steps
            if decoding is not None and index in decoding.segments:
                continue
            attended = self._attend(
                q[:, :, rows_of],
                k[:, :, rows_of],
                v[:, :, rows_of],
                cache.keys[layer],
                cache.values[layer],
                start,
            )  # (1, H, T, D)
            out[:, rows_of] = attended.transpose(1, 2)
        return self.o_proj(out.view(1, rows, heads * head_dim))

    def _rotated(self, x: torch.Tensor, pack: Pack, dtype: torch.dtype) -> torch.Tensor:
        """``x`` (1, N, heads, D) turned by each row's rotary angles, in float32, then
        cast to ``dtype`` (the caches')."""
        turned = block_ops.rope(x, pack.cos, pack.sin) if self.native_ops else None
        if turned is None:
            turned = apply_rope(x.float(), pack.cos, pack.sin)
        return turned if turned.dtype == dtype else turned.to(dtype)

    def _attend(
        self,
        q: torch.Tensor,  # (1, H, T, D) one segment's queries, rotated, in the compute dtype
        k: torch.Tensor,  # (1, Hkv, T, D)
        v: torch.Tensor,
        k_cache: torch.Tensor,  # (1, Hkv, S, D) in the compute dtype, for the whole session
        v_cache: torch.Tensor,
        start: int,  # position of the segment's first row in its sequence
    ) -> torch.Tensor:
        steps = q.shape[2]
        end = start + steps
        k_cache[:, :, start:end] = k
        v_cache[:, :, start:end] = v

        first_key = 0
        if self.sliding_window is not None and end > self.sliding_window and steps == 1:
            first_key = end - self.sliding_window  # a decoding token sees only its window
        keys = k_cache[:, :, first_key:end]  # (1, Hkv, S', D)
        values = v_cache[:, :, first_key:end]
        if steps == 1:
            return one_query_attention(q, keys, values)
        mask = self._mask(start, steps, first_key, end, q.device)
        return F.scaled_dot_product_attention(
            q,
            keys,
            values,
            attn_mask=mask,
            is_causal=mask is None and steps > 1 and start == 0,
            enable_gqa=self.num_kv_heads != self.num_heads,
        )  # (1, H, T, D)

    def _mask(
        self, start: int, steps: int, first_key: int, end: int, device: torch.device
    ) -> torch.Tensor | None:
        """Boolean mask (T, S') where True means "may attend"; None when SDPA needs none."""
        window = self.sliding_window
        needs_window = window is not None and end > window
        if steps == 1 or (start == 0 and not needs_window):
            return None  # single query sees every cached key; or plain causal prefill
        query_pos = torch.arange(start, end, device=device)[:, None]  # (T, 1)
        key_pos = torch.arange(first_key, end, device=device)[None, :]  # (1, S')
        allowed = key_pos <= query_pos
        if needs_window:
            assert window is not None
            allowed &= key_pos > query_pos - window
        return allowed


class MLP(nn.Module):
    native_ops = True  # SwiGLU in one native call where it runs (as RMSNorm's)

    def __init__(self, spec: ArchSpec) -> None:
        super().__init__()
        self.gate_proj = Linear(spec.hidden_size, spec.intermediate_size, bias=False)
        self.up_proj = Linear(spec.hidden_size, spec.intermediate_size, bias=False)
        self.down_proj = Linear(spec.intermediate_size, spec.hidden_size, bias=False)
        self.gate_up_proj: nn.Module | None = None  # gate and up stacked, where fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is not None:
            both = self.gate_up_proj(x)
            fused = block_ops.silu_mul(both) if self.native_ops else None
            if fused is not None:
                return self.down_proj(fused)
            gate, up = both.chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, spec: ArchSpec) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.self_attn = Attention(spec)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.mlp = MLP(spec)

    def forward(self, x: torch.Tensor, pack: Pack, layer: int) -> torch.Tensor:
        # x: (1, N, C) float32, the residual stream; the sublayers may return the compute dtype
        x = x + self.self_attn(self.input_layernorm(x), pack, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


class Shard(nn.Module):
    """Layers ``[start, end)`` of a decoder, plus the embedding and/or head at the ends.

    Parameter names follow the checkpoint with the ``model.`` prefix dropped and
    layer indices made local (``layers.0`` is global layer ``start``).
    """

    def __init__(self, spec: ArchSpec, layers: LayerRange) -> None:
        super().__init__()
        layers.check_within(spec.num_layers)
        self.spec = spec
        self.layer_range = layers
        self.is_first = layers.is_first()
        self.is_last = layers.is_last(spec.num_layers)
        self.embed_tokens = (
            nn.Embedding(spec.vocab_size, spec.hidden_size) if self.is_first else None
        )
        self.layers = nn.ModuleList(Block(spec) for _ in layers)
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps) if self.is_last else None
        self.lm_head = (
            Linear(spec.hidden_size, spec.vocab_size, bias=False) if self.is_last else None
        )
        self.rotary = RotaryTable(spec.rope, spec.head_dim)
        self.number_format = NumberFormat()  # set by the loader, with compute_dtype
        # dtype of the block linears' activations, the embedding and the KV cache
        self.compute_dtype = self.number_format.torch_dtype
        # single-step segments' attention in one native call per layer, where it runs
        # (native/attention.py); False: torch's operators per session, for comparison
        self.native_attention = _wanted(ATTENTION_ENV) == "native"
        if _wanted(BLOCK_OPS_ENV) == "torch":  # torch's norms, rotary and SwiGLU
            for module in self.modules():
                if isinstance(module, (RMSNorm, Attention, MLP)):
                    module.native_ops = False

    @property
    def dtype(self) -> torch.dtype:
        """dtype of the hidden states this shard takes and returns: the float32 residual stream."""
        return torch.float32

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def new_cache(self, max_len: int) -> KVCache:
        spec = self.spec
        return KVCache.allocate(
            len(self.layers),
            spec.num_kv_heads,
            max_len,
            spec.head_dim,
            self.compute_dtype,
            self.device,
        )

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        if self.embed_tokens is None:
            raise RuntimeError("this shard does not hold the token embedding")
        return self.embed_tokens(token_ids).float()  # (B, T) -> (B, T, C) float32

    def forward(self, hidden: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Run this shard's blocks on one session's ``hidden`` (1, T, C), append to ``cache``.

        Returns the hidden states for the next shard, or, on the last shard,
        float32 logits for the final position only: (1, vocab).
        """
        return self.forward_batch([hidden], [cache])[0]

    def forward_batch(
        self,
        hiddens: list[torch.Tensor],
        caches: list[KVCache],
        want_logits: list[bool] | None = None,
    ) -> list[torch.Tensor]:
        """One forward over several sessions' steps: ``hiddens[i]`` (1, T_i, C) appends
        to ``caches[i]``, each cache a different session.

        The rows are packed into one (1, sum T_i, C) tensor so every linear reads its
        weights once for the whole batch (decode is bound by reading them); attention
        runs per session against its own cache. Returns, per session, its hidden
        states (1, T_i, C) for the next shard or, on the last shard, float32 logits
        of its final position (1, vocab), or an empty tensor where ``want_logits``
        says the logits are not needed (a prefill chunk that is not the last).
        """
        if len(hiddens) != len(caches) or not hiddens:
            raise ValueError("forward_batch needs one cache per step, and at least one step")
        if len({id(c) for c in caches}) != len(caches):
            raise ValueError("a batch holds at most one step per session")
        steps = tuple(h.shape[1] for h in hiddens)
        for cache, count in zip(caches, steps, strict=True):
            cache.check_room(count)
        starts = tuple(c.length for c in caches)
        device = hiddens[0].device
        tables = [self.rotary.get(s, n, device) for s, n in zip(starts, steps, strict=True)]
        cos = torch.cat([t[0] for t in tables]) if len(tables) > 1 else tables[0][0]
        sin = torch.cat([t[1] for t in tables]) if len(tables) > 1 else tables[0][1]
        decoding = DecodeSessions.of(caches, steps, starts) if self.native_attention else None
        pack = Pack(tuple(caches), steps, starts, cos[:, None, :], sin[:, None, :], decoding)
        # the residual stream is float32 in every number format
        hidden = (torch.cat(hiddens, dim=1) if len(hiddens) > 1 else hiddens[0]).float()
        for index, block in enumerate(self.layers):
            hidden = block(hidden, pack, index)
        for cache, count in zip(caches, steps, strict=True):
            cache.advance(count)
        ends = list(itertools.accumulate(steps))  # one past each session's last row
        if not self.is_last:
            return list(torch.split(hidden, list(steps), dim=1))
        assert self.norm is not None and self.lm_head is not None
        wanted = want_logits or [True] * len(steps)
        rows = [end - 1 for end, want in zip(ends, wanted, strict=True) if want]
        logits = self.lm_head(self.norm(hidden[0, rows, :])).float() if rows else None  # (R, V)
        out: list[torch.Tensor] = []
        taken = 0
        for want in wanted:
            if want:
                assert logits is not None
                out.append(logits[taken : taken + 1])  # (1, vocab)
                taken += 1
            else:
                out.append(torch.empty(0))
        return out
