"""Next-token sampling from float32 logits. Pure: a function of the logits, the
parameters, the session's seed and the position sampled.

``SamplingParams`` is a model concept (how to pick the next token); the wire's
``open`` message carries it to the last node, so it is a strict, frozen model
that rejects unknown fields.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = [
    "MAX_SEED",
    "MAX_TOP_K",
    "MIN_TEMPERATURE",
    "SamplingParams",
    "apply_allowed",
    "mask_bytes",
    "pack_allowed",
    "sample",
    "session_seed",
    "uniform",
    "unpack_allowed",
]

# Bounds that keep every accepted request computable: a temperature below this
# overflows the scaled logits; torch seeds take 64 bits (kept signed-safe); a
# top-k beyond any vocabulary means nothing.
MIN_TEMPERATURE = 1e-3
MAX_SEED = 2**63 - 1
MAX_TOP_K = 1 << 20


def check_temperature(value: float) -> float:
    if 0.0 < value < MIN_TEMPERATURE:
        raise ValueError(f"temperature must be 0 (greedy) or at least {MIN_TEMPERATURE}")
    return value


class SamplingParams(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    temperature: float = Field(default=0.0, ge=0.0, le=100.0)  # 0 means greedy
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0, le=MAX_TOP_K)  # 0 means no top-k filter
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)

    _temperature = field_validator("temperature")(check_temperature)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def session_seed(seed: int | None) -> int:
    """The seed a session samples with: the request's, or a fresh random one."""
    return seed if seed is not None else secrets.randbits(63)


def uniform(seed: int, position: int) -> float:
    """A uniform draw in [0, 1) that is a pure function of (seed, position).

    A counter-based generator (splitmix64 over the pair) rather than a stateful
    stream: a session rebuilt elsewhere from its token history (a new prefill)
    draws at each position exactly what the lost one would have.
    """
    x = (seed * 0x9E3779B97F4A7C15 + position + 1) & _MASK64
    for _ in range(2):  # two rounds of the splitmix64 finaliser
        x = (x + 0x9E3779B97F4A7C15) & _MASK64
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
        x ^= x >> 31
    return (x >> 11) * 2.0**-53


_MASK64 = (1 << 64) - 1


def sample(
    logits: torch.Tensor,
    params: SamplingParams,
    seed: int,
    position: int,
    allowed: torch.Tensor | None = None,
) -> int:
    """Pick one token id from ``logits`` (vocab,) or (1, vocab) for sequence ``position``;
    with ``allowed`` (vocab,) bool, only among the tokens it allows (see ``apply_allowed``)."""
    logits = logits.reshape(-1).float()
    if allowed is not None:
        logits = apply_allowed(logits, allowed)
    if params.greedy:
        return int(torch.argmax(logits))
    scores = logits / params.temperature
    if 0 < params.top_k < scores.numel():
        kth = torch.topk(scores, params.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True)
        cumulative = torch.softmax(sorted_scores, dim=-1).cumsum(dim=-1)
        # drop a token when the mass before it already reaches top_p; the first always stays
        drop_sorted = cumulative - torch.softmax(sorted_scores, dim=-1) >= params.top_p
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        scores = scores.masked_fill(drop, float("-inf"))
    cdf = torch.softmax(scores.double(), dim=-1).cumsum(dim=-1)  # (vocab,) float64
    draw = uniform(seed, position) * float(cdf[-1])
    index = int(torch.searchsorted(cdf, torch.tensor([draw], dtype=torch.float64), right=True))
    return min(index, cdf.numel() - 1)


# -- the allowed-token mask of grammar-constrained decoding ------------------------------
#
# The entry node holds the grammar (``teeshard.entry.grammar``) and sends, with each
# step, one bit per token id of the next position: bit ``i % 8`` of byte ``i // 8`` is
# token ``i`` (least significant bit first), ``ceil(vocab / 8)`` bytes. Every node checks
# it; the last one applies it after the other logit processors and before temperature,
# top-k and top-p, so those filters choose among allowed tokens only.


def mask_bytes(vocab: int) -> int:
    return (vocab + 7) // 8


def pack_allowed(token_ids: Iterable[int], vocab: int) -> bytes:
    """The mask that allows exactly ``token_ids`` (each in ``[0, vocab)``)."""
    out = bytearray(mask_bytes(vocab))
    for token in token_ids:
        if not 0 <= token < vocab:
            raise ValueError(f"token id {token} is outside the vocabulary of {vocab}")
        out[token >> 3] |= 1 << (token & 7)
    return bytes(out)


def unpack_allowed(mask: bytes, vocab: int) -> torch.Tensor:
    """``mask`` as a (vocab,) bool tensor, or ValueError: a mask must have exactly
    ``ceil(vocab / 8)`` bytes, no bit set past the vocabulary, and at least one bit set
    (a step with nothing allowed cannot be sampled)."""
    expected = mask_bytes(vocab)
    if len(mask) != expected:
        raise ValueError(
            f"the allowed-token mask must have {expected} bytes for a vocabulary of {vocab} "
            f"tokens, got {len(mask)}"
        )
    packed = torch.frombuffer(bytearray(mask), dtype=torch.uint8)  # (bytes,)
    shifts = torch.arange(8, dtype=torch.uint8)
    bits = ((packed.unsqueeze(1) >> shifts) & 1).reshape(-1).bool()  # (8 * bytes,)
    if bits[vocab:].any():
        raise ValueError("the allowed-token mask sets bits past the vocabulary")
    allowed = bits[:vocab]
    if not allowed.any():
        raise ValueError("the allowed-token mask allows no token")
    return allowed


def apply_allowed(logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """``logits`` (vocab,) with every token ``allowed`` (vocab,) forbids at -inf.

    Should the other processors have left no allowed token finite (``min_tokens``
    holding back an end-of-sequence id that is the only one allowed), the allowed
    tokens are scored alike: the grammar wins, and sampling stays well defined.
    """
    masked = logits.masked_fill(~allowed, float("-inf"))
    if not torch.isfinite(masked).any():
        masked = torch.zeros_like(logits).masked_fill(~allowed, float("-inf"))
    return masked
