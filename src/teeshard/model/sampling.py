"""Next-token sampling from float32 logits. Pure; the generator carries the seed.

``SamplingParams`` is a model concept (how to pick the next token); the wire's
``open`` message carries it to the last node, so it is a strict, frozen model
that rejects unknown fields.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

__all__ = ["SamplingParams", "new_generator", "sample"]


class SamplingParams(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    temperature: float = Field(default=0.0, ge=0.0, le=100.0)  # 0 means greedy
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0)  # 0 means no top-k filter
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def new_generator(params: SamplingParams) -> torch.Generator:
    generator = torch.Generator(device="cpu")
    if params.seed is not None:
        generator.manual_seed(params.seed)
    else:
        generator.seed()
    return generator


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """Pick one token id from ``logits`` (vocab,) or (1, vocab)."""
    logits = logits.reshape(-1).float()
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
    probs = torch.softmax(scores, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))
