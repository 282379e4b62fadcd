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


@dataclass(frozen=True)
class BatchItem:
    """One session's part of a batch: validated input rows and whether they end its step.

    ``tokens`` (1, T) on the first node, else ``hidden`` (1, T, C). A long prefill
    runs as several items in successive batches; only the one with ``last`` set is
    sampled (on the last node) and its step then complete.
    """

    session: Session
    tokens: torch.Tensor | None = None
    hidden: torch.Tensor | None = None
    last: bool = True
    allowed: torch.Tensor | None = None  # the grammar's mask for the sampled token (vocab,)

    @property
    def rows(self) -> int:
        rows = self.tokens if self.tokens is not None else self.hidden
        assert rows is not None
        return int(rows.shape[1])


@torch.no_grad()
def run_batch(shard: Shard, items: list[BatchItem]) -> list[StepOutput]:
    """Run one batched forward over ``items`` (one per session) and finish each.

    Every item was validated on its own before it joined (its shape, its room in
    the cache), so nothing here can fail for one session and not the others; a
    failure of the node itself (the TSQP accelerator) fails the batch, and no
    cache advances.
    """
    hiddens = [
        shard.embed(item.tokens) if item.tokens is not None else _hidden(item) for item in items
    ]
    caches = [item.session.cache for item in items]
    try:
        outs = shard.forward_batch(hiddens, caches, want_logits=[item.last for item in items])
    except AcceleratorError as exc:  # TSQP: a failed check or no answer; no cache advanced
        raise AcceleratorFailedError(str(exc)) from None
    if not shard.is_last:
        return [StepOutput(hidden=out) for out in outs]
    return [
        finish_last(item.session, out[0], item.allowed) if item.last else StepOutput()
        for item, out in zip(items, outs, strict=True)
    ]


def _hidden(item: BatchItem) -> torch.Tensor:
    assert item.hidden is not None
    return item.hidden


def finish_last(
    session: Session, logits: torch.Tensor, allowed: torch.Tensor | None = None
) -> StepOutput:
    """The last node's end of a step: sample the session's next token from its float32
    ``logits`` (vocab,) at the position just filled (after logit bias, min_tokens and the
    penalties over its token history, then the grammar's mask ``allowed``, (vocab,) bool,
    when the step carries one), record it in that history, and compute its raw logprobs
    when the session's sampling asked for them."""
    params = session.sampling
    token = sample(logits, params, session.seed, session.cache.length, session.history, allowed)
    session.history.append(token)
    logprobs = None
    if params.logprobs is not None:
        logprobs = token_logprobs(logits, token, params.logprobs)
    return StepOutput(
        token=token, logits=logits if session.return_logits else None, logprobs=logprobs
    )


def run_step(
    shard: Shard, session: Session, *, tokens: torch.Tensor | None, hidden: torch.Tensor | None
) -> StepOutput:
    """Run one session's step on validated input: ``tokens`` (1, T) on the first node, else
    ``hidden``: a batch of one."""
    return run_batch(shard, [BatchItem(session, tokens, hidden)])[0]
