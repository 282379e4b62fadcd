"""How the two endpoints spell a choice: its text or delta, its logprobs, its receipts.

Pure functions over what a generation produced; ``serving`` assembles responses.

Logprobs are the raw model's (log-softmax of the last node's float32 logits):
chat's ``{"content": [{"token", "logprob", "bytes", "top_logprobs"}]}`` and the
completions' ``{"tokens", "token_logprobs", "top_logprobs", "text_offset"}``.

Receipts: a single-choice response carries its receipt fields at the top level
(unchanged). With several choices (``n`` > 1 or a list of prompts) every choice is
its own session with its own receipt chain, and each choice object carries its own
``receipts``, ``teeshard`` extension (its request id ``<response id>-<index>``)
and, after a failover, ``receipt_segments``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from teeshard.attest import (
    EXTENSION_FIELD,
    RECEIPTS_FIELD,
    SEGMENTS_FIELD,
    chain_digest,
    response_extension,
)
from teeshard.entry.generation import Generation
from teeshard.model.sampling import TokenLogprobs

Event = dict[str, Any]
TokenText = Callable[[int], str]


def chat_logprobs(entries: Sequence[TokenLogprobs], text: TokenText) -> Event:
    def one(token: int, logprob: float) -> Event:
        piece = text(token)
        return {"token": piece, "logprob": logprob, "bytes": list(piece.encode("utf-8"))}

    return {
        "content": [
            {**one(e.token, e.logprob), "top_logprobs": [one(t, v) for t, v in e.top]}
            for e in entries
        ],
        "refusal": None,
    }


def completion_logprobs(entries: Sequence[TokenLogprobs], text: TokenText, offset: int) -> Event:
    """``offset``: where the first entry's token starts in the choice's text."""
    tokens, offsets = [], []
    for entry in entries:
        piece = text(entry.token)
        tokens.append(piece)
        offsets.append(offset)
        offset += len(piece)
    return {
        "tokens": tokens,
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [{text(t): v for t, v in e.top} for e in entries],
        "text_offset": offsets,
    }


@dataclass(frozen=True)
class Shape:
    """How one endpoint spells its responses."""

    id_prefix: str
    object: str
    chunk_object: str
    chat: bool

    def final_choice(
        self, index: int, text: str, finish: str | None, logprobs: Event | None
    ) -> Event:
        if self.chat:
            message = {"role": "assistant", "content": text}
            return {
                "index": index,
                "message": message,
                "finish_reason": finish,
                "logprobs": logprobs,
            }
        return {"index": index, "text": text, "finish_reason": finish, "logprobs": logprobs}

    def stream_choice(
        self, index: int, text: str | None, finish: str | None, logprobs: Event | None = None
    ) -> Event:
        if self.chat:
            delta = {"content": text} if text is not None else {}
            return {"index": index, "delta": delta, "finish_reason": finish, "logprobs": logprobs}
        return {"index": index, "text": text or "", "finish_reason": finish, "logprobs": logprobs}

    def opening_choice(self, index: int) -> Event | None:
        """Chat streams open each choice with the assistant role."""
        if not self.chat:
            return None
        delta = {"role": "assistant", "content": ""}
        return {"index": index, "delta": delta, "finish_reason": None, "logprobs": None}

    def logprobs(self, entries: Sequence[TokenLogprobs], text: TokenText, offset: int) -> Event:
        if self.chat:
            return chat_logprobs(entries, text)
        return completion_logprobs(entries, text, offset)


CHAT = Shape("chatcmpl", "chat.completion", "chat.completion.chunk", chat=True)
COMPLETION = Shape("cmpl", "text_completion", "text_completion", chat=False)


def receipt_fields(generation: Generation) -> Event:
    """One generation's receipts: ``receipts`` is the chain of the route that finished
    it; after a failover, ``receipt_segments`` holds every route's chain in order with
    the completion tokens it produced, and the digest covers them all."""
    if not generation.receipts:
        return {}
    fields: Event = {
        RECEIPTS_FIELD: [r.to_json() for r in generation.receipts],
        "receipt_digest": digest(generation).hex(),
        EXTENSION_FIELD: response_extension(generation.request_id, generation.token_ids),
        "served_by": list(generation.served_by),  # node ids of the stages, as the entry knows them
    }
    if generation.segments:
        fields[SEGMENTS_FIELD] = [s.to_json() for s in generation.segments]
    return fields


def digest(generation: Generation) -> bytes:
    if generation.segments:
        return chain_digest([r for s in generation.segments for r in s.receipts])
    return chain_digest(generation.receipts)


def response_digest(generations: Sequence[Generation]) -> bytes | None:
    """The digest header: one generation's, or over every choice's chains in order."""
    if not all(g.receipts for g in generations):
        return None
    if len(generations) == 1:
        return digest(generations[0])
    chains = [
        r for g in generations for r in ([r for s in g.segments for r in s.receipts] or g.receipts)
    ]
    return chain_digest(chains)
