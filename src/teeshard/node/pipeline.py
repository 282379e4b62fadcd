"""The pipeline WebSocket endpoint: frames in, work dispatched, replies out.

Each frame is handled in its own task so that requests of different sessions
on one connection overlap (their compute still queues on the node's worker).
A bad frame is answered with an ``error`` message carrying its request id when
it has one; the connection and the node stay up. Frames above the size limit
are refused by the WebSocket layer itself (close code 1009).

Sessions belong to the connection that opened them: when it drops, they are
closed here and downstream, so a vanished upstream never pins cache memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from fastapi import FastAPI
from starlette.websockets import WebSocket, WebSocketDisconnect

from teeshard.attest import AttestationError, Receipt
from teeshard.node.errors import NodeError
from teeshard.node.service import NodeService
from teeshard.transport.codec import ProtocolError, decode, encode, tensor_to_wire
from teeshard.transport.messages import (
    CloseMsg,
    ErrorMsg,
    Message,
    OpenMsg,
    ReceiptWire,
    ResultMsg,
    StepMsg,
)

log = logging.getLogger(__name__)


PIPELINE_PATH = "/pipeline"


def attach_pipeline(app: FastAPI, service: NodeService) -> None:
    """Serve ``service``'s pipeline socket on ``app``."""

    @app.websocket(PIPELINE_PATH)
    async def pipeline(websocket: WebSocket) -> None:
        await serve_pipeline(websocket, service)


async def serve_pipeline(websocket: WebSocket, service: NodeService) -> None:
    await websocket.accept()
    service.counters.pipeline_connections += 1
    send_lock = asyncio.Lock()
    tasks: set[asyncio.Task[None]] = set()
    owned: set[str] = set()  # sessions opened over this connection and not yet closed

    async def reply(message: ResultMsg | ErrorMsg) -> None:
        async with send_lock:
            with contextlib.suppress(WebSocketDisconnect, RuntimeError):
                await websocket.send_bytes(encode(message))

    async def handle(message: Message, frame: bytes) -> None:
        request_id = message.id
        try:
            result = await dispatch(service, message, frame)
            if isinstance(message, OpenMsg):
                owned.add(message.session)
            elif isinstance(message, CloseMsg):
                owned.discard(message.session)
            await reply(result)
        except NodeError as exc:
            service.count_error(exc.code)
            await reply(
                ErrorMsg(id=request_id, code=exc.code, message=exc.message, status=exc.status)
            )
        except Exception:
            service.count_error("internal_error")
            log.exception("request %s failed on layers %s", request_id, service.shard.layer_range)
            await reply(
                ErrorMsg(id=request_id, code="internal_error", message="internal error", status=500)
            )

    try:
        while True:
            frame = await websocket.receive()
            if frame["type"] == "websocket.disconnect":
                break
            data = frame.get("bytes")
            if data is None:
                service.count_error("bad_request")
                await reply(
                    ErrorMsg(
                        id=None,
                        code="bad_request",
                        message="pipeline frames must be binary msgpack",
                        status=400,
                    )
                )
                continue
            try:
                message = decode(data)
            except ProtocolError as exc:
                service.count_error("bad_request")
                await reply(
                    ErrorMsg(id=exc.request_id, code="bad_request", message=str(exc), status=400)
                )
                continue
            task = asyncio.create_task(handle(message, data))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
    except WebSocketDisconnect:
        pass
    finally:
        # Let in-flight steps finish so caches stay consistent; their replies are dropped.
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        for session_id in owned:
            await service.close_session(session_id)
        if owned:
            log.info("upstream left; closed its %d open sessions", len(owned))


def _receipt(wire: ReceiptWire) -> Receipt:
    try:
        return Receipt.from_json(wire.model_dump())
    except AttestationError as exc:
        raise NodeError(
            f"invalid upstream receipt: {exc}", code="bad_request", status=400
        ) from None


async def dispatch(service: NodeService, message: Message, frame: bytes) -> ResultMsg:
    """Run one request; ``frame`` is its raw bytes (a step's receipt hashes them)."""
    if isinstance(message, OpenMsg):
        route = await service.open_session(
            message.session,
            message.max_len,
            message.sampling,
            message.wire_dtype,
            message.return_logits,
        )
        return ResultMsg(id=message.id, route=route)
    if isinstance(message, StepMsg):
        if (message.tokens is None) == (message.hidden is None):
            raise NodeError(
                "a step carries exactly one of tokens or hidden", code="bad_request", status=400
            )
        result = await service.step_wire(message, frame)
        logits = tensor_to_wire(result.logits, "float32") if result.logits is not None else None
        return ResultMsg(id=message.id, token=result.token, logits=logits)
    if isinstance(message, CloseMsg):
        previous = _receipt(message.receipt) if message.receipt is not None else None
        receipts = await service.close_session(
            message.session, sign=message.sign or previous is not None, previous=previous
        )
        if receipts is None:
            raise NodeError(
                f"unknown session {message.session}", code="unknown_session", status=404
            )
        return ResultMsg(
            id=message.id, receipts=tuple(ReceiptWire(**r.to_json()) for r in receipts)
        )
    raise NodeError(
        f"a node does not accept {message.type!r} messages", code="bad_request", status=400
    )
