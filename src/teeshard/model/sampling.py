"""Next-token sampling from float32 logits. Pure: a function of the logits, the
parameters, the session's token history, its seed and the position sampled.

``SamplingParams`` is a model concept (how to pick the next token); the wire's
``open`` message carries it to the last node, so it is a strict, frozen model
that rejects unknown fields.

The order of the logits processing is vLLM's: ``logit_bias`` is added, ``min_tokens``
holds back the end-of-sequence ids, then the penalties (repetition over the prompt
and the output, then frequency and presence over the output), then temperature,
top-k and top-p. Greedy is the argmax of the processed logits. Logprobs are the
raw model's (the log-softmax of the logits before any of this), as vLLM and
OpenAI report them.
"""

from __future__ import annotations

import secrets
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Annotated

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = [
    "MAX_LOGIT_BIAS",
    "MAX_LOGPROBS",
    "MAX_SEED",
    "MAX_TOP_K",
    "MIN_TEMPERATURE",
    "SamplingParams",
    "TokenHistory",
    "TokenLogprobs",
    "apply_allowed",
    "choice_seed",
    "mask_bytes",
    "pack_allowed",
    "process_logits",
    "sample",
    "session_seed",
    "token_logprobs",
    "uniform",
    "unpack_allowed",
]

# Bounds that keep every accepted request computable: a temperature below this
# overflows the scaled logits; torch seeds take 64 bits (kept signed-safe); a
# top-k beyond any vocabulary means nothing.
MIN_TEMPERATURE = 1e-3
MAX_SEED = 2**63 - 1
MAX_TOP_K = 1 << 20
MAX_LOGPROBS = 20  # top alternatives per position (vLLM's default cap)
MAX_LOGIT_BIAS = 1024  # entries of logit_bias


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
    # vLLM's semantics: repetition divides a positive logit (multiplies a negative one)
    # of every token seen in the prompt or the output; frequency subtracts its count in
    # the output times the penalty, presence the penalty once it has appeared.
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(default=1.0, gt=0.0, le=2.0)
    # (token id, bias added to its logit), ids unique
    logit_bias: tuple[tuple[int, float], ...] = Field(default=(), max_length=MAX_LOGIT_BIAS)
    min_tokens: int = Field(default=0, ge=0)  # the eos ids cannot be sampled before this many
    # what min_tokens holds back
    eos_token_ids: tuple[Annotated[int, Field(ge=0)], ...] = Field(default=(), max_length=64)
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)  # None: none returned

    _temperature = field_validator("temperature")(check_temperature)

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, value: tuple[tuple[int, float], ...]) -> tuple[tuple[int, float], ...]:
        if any(not -100.0 <= b <= 100.0 or t < 0 for t, b in value):
            raise ValueError("logit_bias: token ids >= 0, biases in [-100, 100]")
        if len({t for t, _ in value}) != len(value):
            raise ValueError("logit_bias: each token id once")
        return value

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def needs_output(self) -> bool:
        """Sampling depends on the tokens produced so far (a rebuilt session needs them)."""
        return (
            self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
            or self.repetition_penalty != 1.0
            or self.min_tokens > 0
        )

    @property
    def needs_prompt(self) -> bool:
        """Sampling depends on which tokens the prompt holds (repetition penalty only)."""
        return self.repetition_penalty != 1.0


class TokenHistory:
    """What the penalties see of a session: the distinct prompt ids and the output so far.

    Kept by the last node; a session rebuilt elsewhere starts from the output the lost
    one had produced (carried in ``open``), so it processes the logits alike.
    """

    def __init__(self, prompt: Iterable[int] = (), output: Iterable[int] = ()) -> None:
        self.prompt = frozenset(prompt)
        self.output: list[int] = []
        self.counts: Counter[int] = Counter()
        for token in output:
            self.append(token)

    def append(self, token: int) -> None:
        self.output.append(token)
        self.counts[token] += 1


@dataclass(frozen=True)
class TokenLogprobs:
    """The raw model's log-probability of the sampled token and of the top alternatives."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token id, logprob), most likely first


def session_seed(seed: int | None) -> int:
    """The seed a session samples with: the request's, or a fresh random one."""
    return seed if seed is not None else secrets.randbits(63)


def choice_seed(seed: int, index: int) -> int:
    """The seed of choice ``index`` of a request seeded with ``seed`` (n > 1): choice 0
    keeps it (one choice samples as before), the others get distinct ones that are a
    pure function of (seed, index), so the whole response is reproducible."""
    if index == 0:
        return seed
    return int(uniform(seed ^ 0x5EED_C401CE, index) * 2.0**53) << 10 & MAX_SEED


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


def process_logits(
    logits: torch.Tensor, params: SamplingParams, history: TokenHistory | None = None
) -> torch.Tensor:
    """``logits`` (vocab,) after logit_bias, min_tokens and the penalties (a new tensor)."""
    out = logits.reshape(-1).float().clone()  # (vocab,)
    vocab = out.numel()
    if params.logit_bias:
        ids = torch.tensor([t for t, _ in params.logit_bias if t < vocab], dtype=torch.long)
        bias = torch.tensor([b for t, b in params.logit_bias if t < vocab], dtype=out.dtype)
        out.index_add_(0, ids, bias)
    produced = len(history.output) if history is not None else 0
    if produced < params.min_tokens and params.eos_token_ids:
        eos = torch.tensor([t for t in params.eos_token_ids if t < vocab], dtype=torch.long)
        out.index_fill_(0, eos, float("-inf"))
    if history is None:
        return out
    if params.repetition_penalty != 1.0:
        seen = sorted(t for t in history.prompt | history.counts.keys() if t < vocab)
        if seen:
            index = torch.tensor(seen, dtype=torch.long)
            values = out[index]
            penalty = params.repetition_penalty
            out[index] = torch.where(values > 0, values / penalty, values * penalty)
    if history.counts and (params.frequency_penalty or params.presence_penalty):
        pairs = [(t, c) for t, c in history.counts.items() if t < vocab]
        index = torch.tensor([t for t, _ in pairs], dtype=torch.long)
        counts = torch.tensor([c for _, c in pairs], dtype=out.dtype)
        out.index_add_(0, index, -(params.frequency_penalty * counts + params.presence_penalty))
    return out


def token_logprobs(logits: torch.Tensor, token: int, top: int) -> TokenLogprobs:
    """The raw log-softmax of ``logits`` (vocab,) at ``token``, with the ``top`` best."""
    logprobs = torch.log_softmax(logits.reshape(-1).float(), dim=-1)  # (vocab,)
    best: tuple[tuple[int, float], ...] = ()
    if top > 0:
        values, ids = torch.topk(logprobs, min(top, logprobs.numel()))
        best = tuple((int(i), float(v)) for i, v in zip(ids, values, strict=True))
    return TokenLogprobs(token, float(logprobs[token]), best)


def sample(
    logits: torch.Tensor,
    params: SamplingParams,
    seed: int,
    position: int,
    history: TokenHistory | None = None,
    allowed: torch.Tensor | None = None,
) -> int:
    """Pick one token id from ``logits`` (vocab,) or (1, vocab) for sequence ``position``;
    with ``allowed`` (vocab,) bool, only among the tokens it allows (see ``apply_allowed``:
    after the other logit processors, before temperature, top-k and top-p)."""
    logits = process_logits(logits, params, history)
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
