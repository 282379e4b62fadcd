"""The pure compute of one pipeline step: check the input, run the shard, sample.

No I/O here: the pipeline handler decodes frames and forwards results; this
module only turns a validated input into either hidden states for the next
node or, on the last node, a token id.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from teeshard.model.sampling import TokenLogprobs, sample, token_logprobs, unpack_allowed
from teeshard.model.transformer import CacheFullError as ModelCacheFullError
from teeshard.model.transformer import Shard
from teeshard.node.errors import AcceleratorFailedError, BadRequestError, CacheFullError
from teeshard.offload.errors import AcceleratorError

if TYPE_CHECKING:
    from teeshard.node.service import Session


@dataclass(frozen=True)
class StepOutput:
    hidden: torch.Tensor | None = None  # (1, T, C) for the next node
    token: int | None = None  # sampled on the last node
    logits: torch.Tensor | None = None  # (vocab,) float32, only when the session asked
    logprobs: TokenLogprobs | None = None  # only when the session's sampling asked


def check_tokens(
    shard: Shard, session: Session, tokens: tuple[int, ...] | list[int]
) -> torch.Tensor:
    if not shard.is_first:
        raise BadRequestError(
            f"node serves layers {shard.layer_range} and takes hidden states, not tokens"
        )
    if not tokens:
        raise BadRequestError("a step needs at least one token")
    vocab = shard.spec.vocab_size
    if any(t < 0 or t >= vocab for t in tokens):
        raise BadRequestError(f"token ids must lie in [0, {vocab})")
    _check_room(session, len(tokens))
    return torch.tensor([list(tokens)], dtype=torch.long)  # (1, T)


def check_hidden(shard: Shard, session: Session, hidden: torch.Tensor) -> torch.Tensor:
    if shard.is_first:
        raise BadRequestError("node serves layer 0 and takes token ids, not hidden states")
    width = shard.spec.hidden_size
    if hidden.dim() != 3 or hidden.shape[0] != 1 or hidden.shape[1] < 1 or hidden.shape[2] != width:
        raise BadRequestError(
            f"hidden states must have shape (1, T, {width}), got {tuple(hidden.shape)}"
        )
    if not torch.isfinite(hidden).all():
        raise BadRequestError("hidden states contain NaN or infinity")
    _check_room(session, hidden.shape[1])
    return hidden.to(shard.dtype)


def check_allowed(shard: Shard, allowed: bytes | None) -> torch.Tensor | None:
    """The step's allowed-token mask (grammar-constrained decoding), unpacked, or None."""
    if allowed is None:
        return None
    try:
        return unpack_allowed(allowed, shard.spec.vocab_size)
    except ValueError as exc:
        raise BadRequestError(str(exc)) from None


def _check_room(session: Session, steps: int) -> None:
    """Check before computing, and say so as a node error (400) rather than a model one."""
    try:
        session.cache.check_room(steps)
    except ModelCacheFullError as exc:
        raise CacheFullError(f"session {session.id}: {exc}") from None


@torch.no_grad()
def run_step(
    shard: Shard,
    session: Session,
    *,
    tokens: torch.Tensor | None,
    hidden: torch.Tensor | None,
    allowed: torch.Tensor | None = None,
) -> StepOutput:
    """Run one step on validated input: ``tokens`` (1, T) on the first node, else ``hidden``;
    the last node samples only among the tokens ``allowed`` (vocab,) bool permits."""
    if tokens is not None:
        hidden = shard.embed(tokens)  # (1, T, C)
    assert hidden is not None
    try:
        out = shard(hidden, session.cache)
    except AcceleratorError as exc:  # TSQP: a failed check or no answer; the cache did not advance
        raise AcceleratorFailedError(str(exc)) from None
    if not shard.is_last:
        return StepOutput(hidden=out)
    return sample_tail(session, out[0], allowed)


def sample_tail(
    session: Session, logits: torch.Tensor, allowed: torch.Tensor | None = None
) -> StepOutput:
    """The last node's per-session tail of a step: sample from the float32 ``logits``
    (vocab,) among the tokens ``allowed`` permits (the grammar's mask; None: all), record
    the token in the session's history, and the logprobs if asked."""
    params = session.sampling
    token = sample(logits, params, session.seed, session.cache.length, session.history, allowed)
    session.history.append(token)
    logprobs = None
    if params.logprobs is not None:
        logprobs = token_logprobs(logits, token, params.logprobs)
    return StepOutput(
        token=token, logits=logits if session.return_logits else None, logprobs=logprobs
    )
