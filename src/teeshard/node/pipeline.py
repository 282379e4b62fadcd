"""The pipeline WebSocket endpoint: an attested upstream's frames in, work out.

Trust: nothing is accepted from a connection before its upstream has proved,
in a handshake, what it is. This node sends a fresh challenge; the upstream
answers with its attestation bundle for a nonce derived from that challenge and
this node's certificate (so it proves this very TLS connection and cannot be
relayed), and the ``UpstreamVerifier`` checks it against this node's policy: a
genuine TEE, allowed measurements, and a manifest that the policy expects for
the layers right before this node's. A connection that sends anything else,
or nothing in time, is refused with a clear reason, closed (1008), and counted.

Sessions belong to the connection that opened them: a step or close of another
connection's session is answered exactly like one of an unknown session, and
when a connection drops, its sessions are closed here and downstream.

Back-pressure: each frame is handled in its own task, so requests of different
sessions overlap, but at most ``max_in_flight`` per connection; past that this
endpoint stops reading (the socket's small queue then fills and TCP pushes back).
A bad frame is answered with an ``error`` carrying its request id when it has
one; the connection and the node stay up. Frames above the size limit are
refused by the WebSocket layer itself (close code 1009).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import secrets
from dataclasses import dataclass
from typing import Protocol

from fastapi import FastAPI
from starlette.websockets import WebSocket, WebSocketDisconnect

from teeshard.attest import AttestationError, Receipt
from teeshard.node.errors import BadRequestError, NodeError, UnknownSessionError
from teeshard.node.service import NodeService, Owner
from teeshard.transport import (
    CHALLENGE_BYTES,
    ChallengeMsg,
    CloseMsg,
    ErrorMsg,
    IntroduceMsg,
    Message,
    OpenMsg,
    ProtocolError,
    ReceiptWire,
    ResultMsg,
    StepMsg,
    decode,
    encode,
    logprobs_to_wire,
    tensor_to_wire,
)

log = logging.getLogger(__name__)
PIPELINE_PATH = "/pipeline"
POLICY_VIOLATION = 1008  # WebSocket close code: the peer broke this endpoint's policy


@dataclass(frozen=True)
class PipelineLimits:
    max_in_flight: int = 32  # frames being handled per connection before reading pauses
    handshake_timeout_s: float = 10.0  # for the upstream's introduction


@dataclass(frozen=True)
class Upstream:
    """An upstream that proved itself: who it is, as this node's verifier saw it."""

    fingerprint: str  # hex SHA-256 of its attested certificate
    description: str  # for logs: provider, layers, manifest prefix


class UpstreamVerifier(Protocol):
    async def verify_upstream(self, challenge: bytes, bundle: bytes) -> Upstream:
        """Check an introduction; raise ``AttestationError`` with the reason to refuse."""
        ...


def attach_pipeline(
    app: FastAPI,
    service: NodeService,
    verifier: UpstreamVerifier,
    limits: PipelineLimits | None = None,
) -> None:
    """Serve ``service``'s pipeline socket on ``app``, for upstreams ``verifier`` admits."""
    limits = limits or PipelineLimits()

    @app.websocket(PIPELINE_PATH)
    async def pipeline(websocket: WebSocket) -> None:
        await serve_pipeline(websocket, service, verifier, limits)


_connections = itertools.count(1)


async def serve_pipeline(
    websocket: WebSocket,
    service: NodeService,
    verifier: UpstreamVerifier,
    limits: PipelineLimits,
) -> None:
    await websocket.accept()
    upstream = await _handshake(websocket, service, verifier, limits)
    if upstream is None:
        return
    service.counters.pipeline_connections += 1
    owner = Owner(upstream.fingerprint, next(_connections))
    counters = service.counters
    send_lock = asyncio.Lock()
    tasks: set[asyncio.Task[None]] = set()

    def finished(task: asyncio.Task[None]) -> None:
        tasks.discard(task)
        counters.frames_in_flight -= 1

    owned: set[str] = set()  # sessions opened over this connection and not yet closed

    async def reply(message: ResultMsg | ErrorMsg) -> None:
        async with send_lock:
            with contextlib.suppress(WebSocketDisconnect, RuntimeError):
                await websocket.send_bytes(encode(message))

    async def refuse(exc: NodeError, request_id: int | None) -> None:
        service.count_error(exc.code)
        await reply(
            ErrorMsg(
                id=request_id,
                code=exc.code,
                message=exc.message,
                status=exc.status,
                node=getattr(exc, "node", None),  # downstream_failed: which node failed
            )
        )

    async def handle(message: Message, frame: bytes) -> None:
        request_id = getattr(message, "id", None)
        try:
            result = await dispatch(service, message, frame, owner)
            if isinstance(message, OpenMsg):
                owned.add(message.session)
            elif isinstance(message, CloseMsg):
                owned.discard(message.session)
            await reply(result)
        except NodeError as exc:
            await refuse(exc, request_id)
        except Exception:
            service.count_error("internal_error")
            log.exception("a pipeline request failed on layers %s", service.shard.layer_range)
            await reply(
                ErrorMsg(id=request_id, code="internal_error", message="internal error", status=500)
            )

    try:
        while True:
            if len(tasks) >= limits.max_in_flight:  # back-pressure: stop reading until one ends
                await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                continue
            frame = await websocket.receive()
            if frame["type"] == "websocket.disconnect":
                break
            data = frame.get("bytes")
            if data is None:
                await refuse(BadRequestError("pipeline frames must be binary msgpack"), None)
                continue
            try:
                message = decode(data)
            except ProtocolError as exc:
                await refuse(BadRequestError(str(exc)), exc.request_id)
                continue
            task = asyncio.create_task(handle(message, data))
            tasks.add(task)
            counters.frame_started()
            task.add_done_callback(finished)
    except WebSocketDisconnect:
        pass
    finally:
        # Let in-flight steps finish so caches stay consistent; their replies are dropped.
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        for session_id in owned:
            await service.close_session(session_id, owner=owner)
        if owned:
            log.info("upstream left; closed its %d open sessions", len(owned))


async def _handshake(
    websocket: WebSocket, service: NodeService, verifier: UpstreamVerifier, limits: PipelineLimits
) -> Upstream | None:
    """Challenge the upstream and verify its introduction; None (and closed) when refused."""
    challenge = secrets.token_bytes(CHALLENGE_BYTES)
    reason, message = "bad_introduction", "the first frame must introduce an attested upstream"
    try:
        await websocket.send_bytes(encode(ChallengeMsg(nonce=challenge)))
        frame = await asyncio.wait_for(websocket.receive(), limits.handshake_timeout_s)
        data = frame.get("bytes")
        introduction = decode(data) if data is not None else None
        if isinstance(introduction, IntroduceMsg):
            upstream = await verifier.verify_upstream(challenge, introduction.bundle)
            await websocket.send_bytes(encode(ResultMsg(id=0)))
            log.info("upstream admitted: %s", upstream.description)
            return upstream
    except TimeoutError:
        reason, message = "timeout", "no introduction in time"
    except ProtocolError as exc:
        message = f"the introduction does not decode: {exc}"
    except AttestationError as exc:
        reason, message = "attestation_failed", f"upstream attestation refused: {exc}"
    except (WebSocketDisconnect, RuntimeError):
        service.counters.refused[reason] += 1
        return None
    service.counters.refused[reason] += 1
    log.warning("refused a pipeline connection (%s): %s", reason, message)
    with contextlib.suppress(WebSocketDisconnect, RuntimeError):
        await websocket.send_bytes(
            encode(ErrorMsg(id=None, code="attestation_failed", message=message, status=403))
        )
        await websocket.close(code=POLICY_VIOLATION, reason=reason)
    return None


def _receipt(wire: ReceiptWire) -> Receipt:
    try:
        return Receipt.from_json(wire.model_dump())
    except AttestationError as exc:
        raise BadRequestError(f"invalid upstream receipt: {exc}") from None


async def dispatch(service: NodeService, message: Message, frame: bytes, owner: Owner) -> ResultMsg:
    """Run one request for ``owner``; ``frame`` is its raw bytes (a step's receipt hashes them)."""
    if isinstance(message, OpenMsg):
        route = await service.open_session(
            message.session,
            message.max_len,
            message.sampling,
            message.wire_dtype,
            message.return_logits,
            owner=owner,
            route=message.route,
            history=message.history,
        )
        return ResultMsg(id=message.id, route=route)
    if isinstance(message, StepMsg):
        if (message.tokens is None) == (message.hidden is None):
            raise BadRequestError("a step carries exactly one of tokens or hidden")
        result = await service.step_wire(message, frame, owner)
        logits = tensor_to_wire(result.logits, "float32") if result.logits is not None else None
        logprobs = logprobs_to_wire(result.logprobs) if result.logprobs is not None else None
        return ResultMsg(id=message.id, token=result.token, logits=logits, logprobs=logprobs)
    if isinstance(message, CloseMsg):
        previous = _receipt(message.receipt) if message.receipt is not None else None
        receipts = await service.close_session(
            message.session,
            sign=message.sign or previous is not None,
            previous=previous,
            owner=owner,
        )
        if receipts is None:
            raise UnknownSessionError(f"unknown session {message.session}")
        return ResultMsg(
            id=message.id, receipts=tuple(ReceiptWire(**r.to_json()) for r in receipts)
        )
    raise BadRequestError(f"a node does not accept {message.type!r} messages")
