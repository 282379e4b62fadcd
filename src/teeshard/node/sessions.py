"""Open sessions on one node: their caches, admission control and idle eviction.

A session reserves ``max_len`` cache positions when it opens; the node refuses
new sessions once either the session count or the reserved token total would
pass its budget, so memory for every admitted session is known in advance.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from teeshard.attest import TrafficHash
from teeshard.model.sampling import SamplingParams, new_generator
from teeshard.model.transformer import KVCache
from teeshard.node.errors import BadRequestError, OverloadedError, UnknownSessionError


@dataclass(frozen=True)
class SessionLimits:
    max_sessions: int = 16
    max_cached_tokens: int = 65536  # sum of max_len over open sessions
    idle_timeout_s: float = 300.0


@dataclass
class Session:
    id: str
    cache: KVCache
    wire_dtype: str
    sampling: SamplingParams
    generator: torch.Generator
    return_logits: bool
    last_used: float = field(default_factory=time.monotonic)
    # What this stage received and sent for the session, for its signed receipt:
    # frames from upstream / to downstream; the last stage's "sent" is its tokens.
    received: TrafficHash = field(default_factory=TrafficHash)
    sent: TrafficHash = field(default_factory=TrafficHash)
    input_digest: bytes | None = None  # entry node: SHA-256 of the client's request body

    @property
    def max_len(self) -> int:
        return self.cache.max_len

    def touch(self) -> None:
        self.last_used = time.monotonic()


class SessionStore:
    def __init__(self, limits: SessionLimits, max_len_cap: int) -> None:
        self.limits = limits
        self.max_len_cap = max_len_cap  # the model's context length
        self._sessions: dict[str, Session] = {}
        self.evicted_total = 0

    def __len__(self) -> int:
        return len(self._sessions)

    @property
    def reserved_tokens(self) -> int:
        return sum(s.max_len for s in self._sessions.values())

    def admit(self, session_id: str, max_len: int) -> None:
        """Raise unless a session of ``max_len`` positions may open now."""
        if session_id in self._sessions:
            raise BadRequestError(f"session {session_id} is already open", code="session_exists")
        if max_len > self.max_len_cap:
            raise BadRequestError(
                f"max_len {max_len} exceeds the model's context of {self.max_len_cap} tokens",
                code="context_length_exceeded",
            )
        if len(self._sessions) >= self.limits.max_sessions:
            raise OverloadedError(
                f"node is at its limit of {self.limits.max_sessions} open sessions; retry later"
            )
        if self.reserved_tokens + max_len > self.limits.max_cached_tokens:
            raise OverloadedError(
                f"KV cache budget exhausted: {self.reserved_tokens} of "
                f"{self.limits.max_cached_tokens} tokens reserved, {max_len} more requested"
            )

    def open(
        self,
        session_id: str,
        max_len: int,
        allocate: Callable[[int], KVCache],
        wire_dtype: str,
        sampling: SamplingParams,
        return_logits: bool,
    ) -> Session:
        """Admit, then allocate the cache: a refused session costs no memory."""
        self.admit(session_id, max_len)
        session = Session(
            session_id,
            allocate(max_len),
            wire_dtype,
            sampling,
            new_generator(sampling),
            return_logits,
        )
        self._sessions[session_id] = session
        return session

    def get(self, session_id: str) -> Session:
        try:
            session = self._sessions[session_id]
        except KeyError:
            raise UnknownSessionError(
                f"unknown session {session_id} (never opened, closed or evicted)"
            ) from None
        session.touch()
        return session

    def close(self, session_id: str) -> Session | None:
        return self._sessions.pop(session_id, None)

    def evict_idle(self, now: float | None = None) -> list[str]:
        now = time.monotonic() if now is None else now
        stale = [
            sid
            for sid, s in self._sessions.items()
            if now - s.last_used > self.limits.idle_timeout_s
        ]
        for sid in stale:
            del self._sessions[sid]
        self.evicted_total += len(stale)
        return stale
