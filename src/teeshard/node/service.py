"""One pipeline stage: its sessions and steps, local compute, then the next hop.

Sessions: each reserves ``max_len`` cache positions when it opens; the stage
refuses new sessions once either the session count or the reserved token total
would pass its budget, so memory for every admitted session is known in
advance; idle sessions are evicted.

Steps: the pipeline socket and the entry node's generation loop both drive a
stage through ``NodeService``. A checked step goes to the node's
``StepScheduler``, which runs the ready steps of all sessions as one batched
forward on one worker thread (torch uses all cores inside each op), so the
event loop stays free for I/O while a batch runs; the next node is reached
through ``NextHop``, each session's step forwarded as soon as its part of the
batch is done, so while node B computes one batch node A computes the next.

Error handling: a step that fails downstream rolls the local cache back, so the
session is exactly as before the step; a failed ``open`` downstream closes the
local session again. Errors from the next node keep their code and status.
"""

from __future__ import annotations

import logging
import math
import struct
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from teeshard.attest import NodeAttestation, Receipt, TrafficHash
from teeshard.model.sampling import SamplingParams, TokenHistory, TokenLogprobs, session_seed
from teeshard.model.transformer import KVCache, Shard
from teeshard.node.compute import StepOutput, check_allowed, check_hidden, check_tokens
from teeshard.node.errors import BadRequestError, OverloadedError, UnknownSessionError
from teeshard.node.hop import NextHop
from teeshard.node.scheduler import SchedulerLimits, StepScheduler
from teeshard.transport.codec import ProtocolError, tensor_from_wire, tensor_to_wire
from teeshard.transport.messages import SamplingHistory, StepMsg, WireDtype

log = logging.getLogger(__name__)

# -- sessions and admission -----------------------------------------------------------


@dataclass(frozen=True)
class SessionLimits:
    max_sessions: int = 16
    max_cached_tokens: int = 65536  # sum of max_len over open sessions
    idle_timeout_s: float = 300.0
    # a session opened but never stepped holds its reservation only this long
    unstepped_timeout_s: float = 30.0
    # open sessions one upstream (one attested identity) may hold; None: max_sessions
    max_sessions_per_peer: int | None = None


@dataclass(frozen=True)
class Owner:
    """Who opened a session over the pipeline: an attested upstream, on one connection.

    Only the same connection may step or close it; quotas count per ``peer``.
    Sessions the entry node opens for its own API have no owner (``None``).
    """

    peer: str  # hex fingerprint of the upstream's attested certificate
    connection: int  # distinct for every connection this process accepted


@dataclass
class Session:
    id: str
    cache: KVCache
    wire_dtype: str
    sampling: SamplingParams
    seed: int  # sampling draws are a pure function of (seed, position)
    return_logits: bool
    owner: Owner | None = None
    last_used: float = field(default_factory=time.monotonic)
    stepped: bool = False  # a first step ran (until then the short idle timeout applies)
    in_flight: bool = False  # a step is running: the cache is sequential, one at a time
    # What this stage received and sent for the session, for its signed receipt:
    # frames from upstream / to downstream; the last stage's "sent" is its tokens.
    received: TrafficHash = field(default_factory=TrafficHash)
    sent: TrafficHash = field(default_factory=TrafficHash)
    input_digest: bytes | None = None  # entry node: SHA-256 of the client's request body
    next_url: str | None = None  # the next node of this session's route (None: last stage)
    # last stage: what its sampling's penalties see (the prompt's ids, the output so far)
    history: TokenHistory = field(default_factory=TokenHistory)

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

    def stepping(self, recent_s: float = math.inf) -> int:
        """Open sessions that have stepped and may step again soon (for batching): with a
        step running or one that ended at most ``recent_s`` ago (a session whose client
        stopped reading is not about to step)."""
        since = time.monotonic() - recent_s
        return sum(
            1
            for s in self._sessions.values()
            if s.stepped and (s.in_flight or s.last_used >= since)
        )

    @property
    def reserved_tokens(self) -> int:
        return sum(s.max_len for s in self._sessions.values())

    def admit(self, session_id: str, max_len: int, owner: Owner | None = None) -> None:
        """Raise unless a session of ``max_len`` positions may open now (for ``owner``)."""
        if session_id in self._sessions:
            raise BadRequestError(f"session {session_id} is already open", code="session_exists")
        if max_len > self.max_len_cap:
            raise BadRequestError(
                f"max_len {max_len} exceeds the model's context of {self.max_len_cap} tokens",
                code="context_length_exceeded",
            )
        if max_len > self.limits.max_cached_tokens:  # not now, and never: waiting cannot help
            raise BadRequestError(
                f"the session needs {max_len} cache positions; this node reserves at most "
                f"{self.limits.max_cached_tokens} over all sessions",
                code="context_length_exceeded",
            )
        if len(self._sessions) >= self.limits.max_sessions:
            raise OverloadedError(
                f"node is at its limit of {self.limits.max_sessions} open sessions; retry later"
            )
        quota = self.limits.max_sessions_per_peer
        if owner is not None and quota is not None:
            held = sum(1 for s in self._sessions.values() if s.owner and s.owner.peer == owner.peer)
            if held >= quota:
                raise OverloadedError(
                    f"this upstream holds {held} open sessions, its limit here; retry later"
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
        owner: Owner | None = None,
    ) -> Session:
        """Admit, then allocate the cache: a refused session costs no memory."""
        self.admit(session_id, max_len, owner)
        session = Session(
            session_id,
            allocate(max_len),
            wire_dtype,
            sampling,
            session_seed(sampling.seed),
            return_logits,
            owner,
        )
        self._sessions[session_id] = session
        return session

    def get(self, session_id: str, owner: Owner | None = None) -> Session:
        """The session, for ``owner``: another owner's session is as unknown as a missing one."""
        session = self._sessions.get(session_id)
        if session is None or session.owner != owner:
            raise UnknownSessionError(
                f"unknown session {session_id} (never opened, closed or evicted)"
            )
        session.touch()
        return session

    def close(self, session_id: str, owner: Owner | None = None) -> Session | None:
        session = self._sessions.get(session_id)
        if session is None or session.owner != owner:
            return None
        return self._sessions.pop(session_id)

    def evict_idle(self, now: float | None = None) -> list[str]:
        now = time.monotonic() if now is None else now

        def timeout(s: Session) -> float:
            if s.stepped:
                return self.limits.idle_timeout_s
            return min(self.limits.idle_timeout_s, self.limits.unstepped_timeout_s)

        stale = [
            sid
            for sid, s in self._sessions.items()
            if not s.in_flight and now - s.last_used > timeout(s)
        ]
        for sid in stale:
            del self._sessions[sid]
        self.evicted_total += len(stale)
        return stale


# -- the stage ------------------------------------------------------------------------


@dataclass(frozen=True)
class StepResult:
    token: int
    logits: torch.Tensor | None = None  # (vocab,) float32 when the session asked for them
    logprobs: TokenLogprobs | None = None  # when the session's sampling asked for them


@dataclass
class StageCounters:
    """What this stage has done, for ``/metrics`` (rendered by ``teeshard.node.metrics``)."""

    steps: int = 0
    tokens_processed: int = 0  # token positions run through this shard
    step_seconds: float = 0.0  # time spent in local compute (batched forwards)
    batches: int = 0  # batched forwards run
    inline_batches: int = 0  # of which run on the event loop's thread (a lone one-row step)
    gather_timeouts: int = 0  # batches that waited for other sessions' steps in vain
    batched_rows: int = 0  # token positions over all batches (rows / batches: mean batch)
    pipeline_connections: int = 0  # admitted after the upstream's introduction
    errors: Counter[str] = field(default_factory=Counter)  # failed requests by error code
    refused: Counter[str] = field(default_factory=Counter)  # pipeline connections, by reason
    frames_in_flight: int = 0  # pipeline frames being handled, over all connections
    frames_in_flight_peak: int = 0  # the most at once since start

    def frame_started(self) -> None:
        self.frames_in_flight += 1
        self.frames_in_flight_peak = max(self.frames_in_flight_peak, self.frames_in_flight)


class NodeService:
    def __init__(
        self,
        shard: Shard,
        model_name: str,
        limits: SessionLimits,
        next_hop: NextHop | None = None,
        node_id: str = "node",
        attestation: NodeAttestation | None = None,
        scheduler: SchedulerLimits | None = None,
    ) -> None:
        if not shard.is_last and next_hop is None:
            raise ValueError(
                f"layers {shard.layer_range} do not end the model ({shard.spec.num_layers} layers): "
                "a next hop is required"
            )
        self.shard = shard
        self.model_name = model_name
        self.node_id = node_id
        self.attestation = attestation  # signs this stage's receipts; None: no receipts
        self.next_hop = next_hop if not shard.is_last else None
        self.sessions = SessionStore(limits, shard.spec.max_position_embeddings)
        self.counters = StageCounters()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="compute")
        # every step runs through the scheduler, batched with other sessions' ready steps
        self.scheduler = StepScheduler.on_executor(
            shard, self._executor, self.counters, scheduler, active=self.sessions.stepping
        )

    # -- sessions --------------------------------------------------------------------

    async def open_session(
        self,
        session_id: str,
        max_len: int,
        sampling: SamplingParams,
        wire_dtype: WireDtype = "float32",
        return_logits: bool = False,
        input_digest: bytes | None = None,
        owner: Owner | None = None,
        route: tuple[str, ...] = (),
        history: SamplingHistory | None = None,
    ) -> tuple[str, ...]:
        """Open a session here and on every later node; return the route's node ids.

        ``route``: the URLs of the nodes after this one, nearest first (empty: this
        node's ``--next``). ``input_digest`` (entry node) is what its receipt says
        it received: the SHA-256 of the client's request body. ``history``: what the
        last stage's sampling needs of the session's past (passed on to it).
        """
        if self.next_hop is None and route:
            raise BadRequestError(
                f"layers {self.shard.layer_range} end the model: a route after them makes no sense",
                code="bad_route",
            )
        session = self.sessions.open(
            session_id, max_len, self.shard.new_cache, wire_dtype, sampling, return_logits, owner
        )
        session.input_digest = input_digest
        if self.next_hop is None:
            if history is not None:
                session.history = TokenHistory(history.prompt_tokens, history.output_tokens)
            return (self.node_id,)
        try:
            session.next_url, later = await self.next_hop.open_session(
                session_id, max_len, sampling, wire_dtype, return_logits, route, history
            )
        except BaseException:
            self.sessions.close(session_id, owner)
            raise
        return (self.node_id, *later)

    async def close_session(
        self,
        session_id: str,
        *,
        sign: bool = False,
        previous: Receipt | None = None,
        owner: Owner | None = None,
    ) -> list[Receipt] | None:
        """Close here and downstream; with ``sign``, return the receipts from here on.

        ``sign`` is for a session that finished normally: this node signs its receipt
        (linked to ``previous``, the upstream stage's) and passes it on, and every
        later node does the same. Returns None when the session was not open here.
        """
        session = self.sessions.close(session_id, owner)
        if session is None:  # not open here, or not ``owner``'s: nothing to pass on
            return None
        own = self._sign(session, previous) if sign else None
        later: list[Receipt] = []
        if self.next_hop is not None and session.next_url is not None:
            later = await self.next_hop.close_session(session.next_url, session_id, own)
        return [own, *later] if own is not None else []

    def _sign(self, session: Session, previous: Receipt | None) -> Receipt | None:
        """This stage's receipt: what it received (the request body on stage 0) and sent."""
        if self.attestation is None:
            return None
        received = session.input_digest or session.received.digest()
        return self.attestation.sign_receipt(
            request_id=session.id,
            stage=previous.stage + 1 if previous is not None else 0,
            received_sha256=received,
            sent_sha256=session.sent.digest(),
            previous=previous,
            positions=session.cache.length,  # the token positions it ran: what credit counts
        )

    def evict_idle(self) -> list[str]:
        evicted = self.sessions.evict_idle()
        if evicted:
            log.info("evicted %d idle sessions", len(evicted))
        return evicted

    # -- steps -----------------------------------------------------------------------

    async def step_tokens(
        self,
        session_id: str,
        tokens: list[int] | tuple[int, ...],
        frame: bytes | None = None,
        owner: Owner | None = None,
        allowed: bytes | None = None,
    ) -> StepResult:
        """A step of token ids; ``allowed``: the grammar's mask for the next position."""
        session = self.sessions.get(session_id, owner)
        inputs = check_tokens(self.shard, session, tokens)
        check_allowed(self.shard, allowed)
        return await self._step(session, tokens=inputs, hidden=None, frame=frame, allowed=allowed)

    async def step_wire(self, message: StepMsg, frame: bytes, owner: Owner) -> StepResult:
        """A step that arrived on the pipeline socket as ``frame``, from ``owner``."""
        if message.hidden is None:
            return await self.step_tokens(
                message.session, message.tokens or (), frame, owner, message.allowed
            )
        session = self.sessions.get(message.session, owner)
        try:
            hidden = tensor_from_wire(message.hidden, expected_dtype=session.wire_dtype)
        except ProtocolError as exc:
            raise BadRequestError(str(exc)) from None
        hidden = check_hidden(self.shard, session, hidden)
        check_allowed(self.shard, message.allowed)
        return await self._step(
            session, tokens=None, hidden=hidden, frame=frame, allowed=message.allowed
        )

    async def _step(
        self,
        session: Session,
        *,
        tokens: torch.Tensor | None,
        hidden: torch.Tensor | None,
        frame: bytes | None,
        allowed: bytes | None = None,
    ) -> StepResult:
        if session.in_flight:  # the cache is sequential: a second step would corrupt it
            raise BadRequestError(
                "a step is already running for this session", code="step_in_flight", status=409
            )
        session.in_flight, session.stepped = True, True
        try:
            length_before = session.cache.length
            mask = check_allowed(self.shard, allowed) if self.shard.is_last else None
            out: StepOutput = await self.scheduler.run(
                session, tokens=tokens, hidden=hidden, allowed=mask
            )
            self.counters.steps += 1
            self.counters.tokens_processed += session.cache.length - length_before
            if out.hidden is None:  # the last stage: its output is the token
                assert out.token is not None
                result = StepResult(out.token, out.logits, out.logprobs)
                session.sent.update(struct.pack("<I", out.token))
            else:
                result = await self._forward(session, out.hidden, length_before, allowed)
            if frame is not None:
                session.received.update(frame)
            return result
        finally:
            session.in_flight = False
            session.touch()

    async def _forward(
        self,
        session: Session,
        hidden: torch.Tensor,
        length_before: int,
        allowed: bytes | None = None,
    ) -> StepResult:
        assert self.next_hop is not None and session.next_url is not None
        wire = tensor_to_wire(hidden, session.wire_dtype)
        frames: list[bytes] = []
        try:
            reply = await self.next_hop.step(
                session.next_url, session.id, wire, on_frame=frames.append, allowed=allowed
            )
        except BaseException:
            session.cache.length = length_before  # keep the session consistent for a retry
            raise
        # Only a step that succeeded counts as sent, as the next node counts what it
        # received: the receipts of a route that lost a node still link.
        for frame in frames:
            session.sent.update(frame)
        return StepResult(reply.token, reply.logits, reply.logprobs)

    def count_error(self, code: str) -> None:
        self.counters.errors[code] += 1

    async def shutdown(self) -> None:
        await self.scheduler.stop()
        if self.next_hop is not None:
            await self.next_hop.disconnect()
        self._executor.shutdown(wait=False, cancel_futures=True)
