"""The generation loop: prefill, then one pipeline step per new token.

One session per request, opened on every node with room for the prompt plus
the completion budget and closed in every outcome (done, error, client gone).
With a ledger, the most a request can cost is reserved before the session opens
and settled (or released) once it closes; without one nothing is charged.

Routes and failover (with a registry, ``--network``): each session gets a route
from the registry. When a step or an open fails for a transport reason (the
hop that lost its peer names it: ``DownstreamError.transport_fault``), that node
is banned for a while, the session's segment is closed (the nodes still alive
sign its receipts), a new route is chosen, the session is opened there and
rebuilt by one prefill of the prompt plus every token so far, and generation
goes on: greedy output is identical by construction, sampled output because the
draws are a function of (seed, position). Attestation failures and bad input
are never retried. A grammar (structured output, tool calls) lives here too:
each step carries the mask of tokens its matcher allows next, each sampled token
is checked against it, and the completion ends once the grammar is complete. After ``FailoverPolicy.max_attempts`` new routes, or past its
deadline (counted from the request's first fault; until then a session with no
route waits for a node to come back), the request fails with the OpenAI error
object. Billing is untouched: one reservation, settled once.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Literal

from teeshard.attest import Receipt
from teeshard.entry.admission import AdmissionQueue, Gone
from teeshard.entry.billing import Billing, BillingAPI, ChargeRequest, Reservation, Settlement
from teeshard.entry.errors import APIError
from teeshard.entry.failover import FailoverPolicy, FaultLog, ReceiptSegment, Rerouter
from teeshard.entry.grammar import Grammar
from teeshard.entry.registry import Registry
from teeshard.entry.routing import Route
from teeshard.entry.text import IncrementalDecoder, StopMatcher, TextCodec
from teeshard.model.sampling import SamplingParams, TokenLogprobs
from teeshard.node import DownstreamError, NodeError, NodeService, StepResult
from teeshard.transport.messages import SamplingHistory, WireDtype

log = logging.getLogger(__name__)
FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class GenerationParams:
    max_tokens: int
    sampling: SamplingParams
    stop: tuple[str, ...] = ()
    prompt_chars: int | None = None  # characters of the prompt text, for per-character pricing
    ignore_eos: bool = False  # decode max_tokens even past an end-of-sequence token
    # structured output or tool calls: every token is constrained by this grammar, and
    # the completion ends (``stop``) once the grammar is complete
    grammar: Grammar | None = None


@dataclass
class Generation:
    """What a request produced so far; filled in while its deltas stream."""

    request_id: str
    prompt_tokens: int
    completion_tokens: int = 0
    completion_chars: int = 0  # characters of text returned to the client
    finish_reason: FinishReason | None = None
    prefilled: bool = False  # the prompt ran through every node: that work is charged
    closed: bool = False  # the session is closed on every node
    served_by: tuple[str, ...] = ()  # node ids of the route, entry first
    reservation: Reservation | None = None  # None: no ledger, nothing charged
    settlement: Settlement | None = None
    receipts: list[Receipt] = field(default_factory=list)  # signed by every stage, entry first
    token_ids: list[int] = field(default_factory=list)  # every token the last stage sent
    # the raw logprobs of each completion token, when the sampling asked for them
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    billed_prompt_tokens: int | None = None  # None: prompt_tokens (n > 1 bills a prompt once)
    # -- routes and failover --
    route: Route = ()  # node URLs after the entry for the current segment (): its --next
    segments: list[ReceiptSegment] = field(default_factory=list)  # closed segments, in order
    segment_start: int = 0  # index in token_ids of the current segment's first token
    faults: FaultLog = field(default_factory=FaultLog)  # transport faults so far
    # what opening the session again takes (set by ``start``)
    max_len: int = 0
    sampling: SamplingParams = field(default_factory=SamplingParams)
    input_digest: bytes | None = None
    admitted_at: float | None = None  # when the session opened (the queue's service time)
    prompt_ids: tuple[int, ...] = ()  # for the history a rebuilt session's sampling needs

    def history(self) -> SamplingHistory | None:
        """What the last node's sampling needs of the past, when it needs any: the
        distinct prompt ids (repetition penalty) and the tokens so far (a rebuild)."""
        needs_prompt, needs_output = self.sampling.needs_prompt, self.sampling.needs_output
        if not (needs_prompt or (needs_output and self.token_ids)):
            return None
        return SamplingHistory(
            prompt_tokens=tuple(sorted(set(self.prompt_ids))) if needs_prompt else (),
            output_tokens=tuple(self.token_ids) if needs_output else (),
        )


class GenerationLoop:
    def __init__(
        self,
        service: NodeService,
        codec: TextCodec,
        wire_dtype: WireDtype,
        default_max_tokens: int,
        billing: Billing | None = None,
        registry: Registry | None = None,
        failover: FailoverPolicy | None = None,
        admission: AdmissionQueue | None = None,
    ) -> None:
        self.service = service
        # a burst waits here for cache room instead of being refused
        self.admission = admission or AdmissionQueue()
        self.registry = registry  # None: every session takes the static --next
        self.reroute = Rerouter(registry, failover or FailoverPolicy())
        self.billing = BillingAPI(billing) if billing is not None else None
        self._releasing: set[asyncio.Future[None]] = set()  # keeps shielded releases alive
        self.codec = codec
        self.wire_dtype = wire_dtype
        self.default_max_tokens = default_max_tokens
        self.context = service.shard.spec.max_position_embeddings
        self.eos_ids = set(service.shard.spec.eos_token_ids) | codec.eos_ids()

    def shutdown(self) -> None:
        """Release what billing holds (its ledger connection)."""
        if self.billing is not None:
            self.billing.close()

    def resolve_max_tokens(self, prompt_len: int, requested: int | None) -> int:
        """The completion budget, or a 400 explaining why the request cannot fit."""
        if prompt_len == 0:
            raise APIError(400, "the prompt is empty", param="prompt")
        room = self.context - prompt_len
        if room <= 0:
            raise APIError(
                400,
                f"the prompt has {prompt_len} tokens; this model's context is {self.context} tokens",
                code="context_length_exceeded",
                param="messages",
            )
        if requested is None:
            return min(room, self.default_max_tokens)
        if requested <= 0:
            raise APIError(
                400, f"max_tokens must be at least 1, got {requested}", param="max_tokens"
            )
        if requested > room:
            raise APIError(
                400,
                f"max_tokens {requested} plus the prompt's {prompt_len} tokens exceeds this model's "
                f"context of {self.context} tokens",
                code="context_length_exceeded",
                param="max_tokens",
            )
        return requested

    async def start(
        self,
        prompt_ids: list[int],
        params: GenerationParams,
        api_key: str | None = None,
        input_digest: bytes | None = None,
        idempotency_key: str | None = None,
        gone: Gone | None = None,
        *,
        request_id: str | None = None,
        bill_prompt: bool = True,
    ) -> Generation:
        """Reserve the most the request can cost, then open the session on every node,
        waiting in the admission queue while the caches are full.

        Errors here (402 no balance, 429 queue full or waited too long...) happen
        before any output. ``gone``: True once the client left (it leaves the queue).
        ``bill_prompt`` False: the prompt is charged with another choice of the request.
        """
        generation = Generation(
            request_id=request_id or uuid.uuid4().hex, prompt_tokens=len(prompt_ids)
        )
        generation.billed_prompt_tokens = len(prompt_ids) if bill_prompt else 0
        generation.prompt_ids = tuple(prompt_ids)
        if self.billing is not None:
            charge = ChargeRequest(
                generation.request_id,
                api_key,
                self.service.model_name,
                generation.billed_prompt_tokens,
                params.max_tokens,
                params.prompt_chars if bill_prompt else 0,
                idempotency_key,
            )
            generation.reservation = await self.billing.reserve(charge)
        generation.input_digest = input_digest
        generation.max_len = len(prompt_ids) + params.max_tokens
        generation.sampling = params.sampling
        try:
            await self.admission.admit(lambda: self._open(generation), gone)
            generation.admitted_at = time.monotonic()
        except BaseException as exc:
            if self.billing is not None and generation.reservation is not None:
                await self.billing.release(generation.reservation)
            if isinstance(exc, NodeError):
                raise APIError.from_node(exc) from None
            raise
        return generation

    async def stream(
        self, generation: Generation, prompt_ids: list[int], params: GenerationParams
    ) -> AsyncIterator[str]:
        """Yield text deltas; ``generation`` holds counts and the finish reason at the end."""
        decoder = IncrementalDecoder(self.codec, prompt_ids)
        stops = StopMatcher(params.stop)
        # the grammar's matcher stays here: each step carries the next position's mask
        constraint = params.grammar.start() if params.grammar is not None else None
        try:
            allowed = constraint.allowed() if constraint is not None else None
            result = await self._step(generation, prompt_ids, prompt_ids, allowed)
            generation.prefilled = True
            while True:
                token = result.token
                generation.token_ids.append(token)  # its receipt hashes each one, EOS too
                if constraint is not None:
                    constraint.advance(token)  # a token outside the mask: the node is faulty
                if token in self.eos_ids and not params.ignore_eos:
                    generation.finish_reason = "stop"
                    break
                generation.completion_tokens += 1
                if result.logprobs is not None:
                    generation.logprobs.append(result.logprobs)
                delta = stops.feed(decoder.push(token))
                if delta:
                    generation.completion_chars += len(delta)
                    yield delta
                if stops.stopped:
                    generation.finish_reason = "stop"
                    return
                if constraint is not None and constraint.finished:
                    generation.finish_reason = "stop"  # the grammar is complete
                    break
                if generation.completion_tokens >= params.max_tokens:
                    generation.finish_reason = "length"
                    break
                allowed = constraint.allowed() if constraint is not None else None
                result = await self._step(generation, prompt_ids, [token], allowed)
            tail = stops.flush()
            if tail:
                generation.completion_chars += len(tail)
                yield tail
        except NodeError as exc:
            raise APIError.from_node(exc) from None
        finally:
            await self.release(generation)

    # -- routes and failover ---------------------------------------------------------

    async def _open(self, generation: Generation) -> None:
        """Open the session on a route from the registry (or the static --next),
        choosing another route after each transport fault, within the policy."""
        while True:
            try:
                if self.registry is not None:  # else the static --next: route ()
                    generation.route = await self.reroute.choose(generation.faults)
                opened = await self.service.open_session(
                    generation.request_id,
                    generation.max_len,
                    generation.sampling,
                    self.wire_dtype,
                    input_digest=generation.input_digest,
                    route=generation.route,
                    history=generation.history(),
                )
            except DownstreamError as exc:
                self.reroute.fault(generation.faults, exc, generation.request_id)  # or raises
                continue
            if self.registry is not None:
                self.registry.hold(generation.request_id, generation.route)
            generation.served_by = tuple(dict.fromkeys((*generation.served_by, *opened)))
            return

    async def _step(
        self,
        generation: Generation,
        prompt_ids: list[int],
        tokens: list[int],
        allowed: bytes | None = None,
    ) -> StepResult:
        """One step; after a transport fault, rebuild on a new route and step again (the
        rebuild's prefill carries the same mask: it samples the position that was lost)."""
        while True:
            try:
                return await self.service.step_tokens(
                    generation.request_id, tokens, allowed=allowed
                )
            except DownstreamError as exc:
                self.reroute.fault(generation.faults, exc, generation.request_id)  # or raises
            assert self.registry is not None  # fault() raised otherwise
            self.registry.counters.failovers += 1
            await self._close_segment(generation)
            await self._open(generation)
            # one prefill of everything so far: the next token is the one that was lost
            tokens = [*prompt_ids, *generation.token_ids]

    async def _close_segment(self, generation: Generation) -> None:
        """Close the current segment; the stages still reachable sign its receipts."""
        receipts = await self.service.close_session(generation.request_id, sign=True)
        if self.registry is not None:
            self.registry.drop(generation.request_id)
        end = len(generation.token_ids)
        generation.segments.append(
            ReceiptSegment(generation.segment_start, end, tuple(receipts or ()))
        )
        generation.segment_start = end

    async def release(self, generation: Generation) -> None:
        """Close the session everywhere and settle or release its charge, once.

        Whatever the outcome (finished, failed mid-way, abandoned by a client that
        read all but the end), the request is charged for the prompt and the
        completion tokens it actually produced, and only the unused rest of its
        reservation is released; one whose prompt never ran is released in full.
        Safe to call in any outcome,
        and it completes even when the caller is being cancelled (a client that
        went away): the work runs in its own task, shielded from that cancellation.
        """
        if generation.closed:
            return
        generation.closed = True
        task = asyncio.ensure_future(self._release(generation))
        self._releasing.add(task)
        task.add_done_callback(self._released)
        await asyncio.shield(task)

    def _released(self, task: asyncio.Future[None]) -> None:
        self._releasing.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("releasing a generation failed: %s", task.exception())

    async def _release(self, generation: Generation) -> None:
        finished = generation.finish_reason is not None
        try:
            # a finished session is closed with signed receipts from every stage
            receipts = await self.service.close_session(generation.request_id, sign=finished)
            generation.receipts = receipts or []
            if generation.segments and generation.receipts:  # failed over: the last segment
                generation.segments.append(
                    ReceiptSegment(
                        generation.segment_start,
                        len(generation.token_ids),
                        tuple(generation.receipts),
                    )
                )
        finally:
            if self.registry is not None:
                self.registry.drop(generation.request_id)
            if generation.admitted_at is not None:  # its room is free: the next may open
                self.admission.finished(time.monotonic() - generation.admitted_at)
            reservation = generation.reservation
            if self.billing is not None and reservation is not None:
                if finished or generation.prefilled:
                    billed = generation.billed_prompt_tokens
                    generation.settlement = await self.billing.settle(
                        reservation,
                        generation.prompt_tokens if billed is None else billed,
                        generation.completion_tokens,
                        generation.served_by,
                        completion_chars=generation.completion_chars,
                        receipts=generation.receipts,
                    )
                else:
                    await self.billing.release(reservation)
