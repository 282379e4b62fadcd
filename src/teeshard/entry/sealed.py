"""``POST /v1/sealed``: requests sealed end to end to the entry node's attested key.

A client that verified this node's bundle seals its API key, a timestamp, a
random request id, the path and the body with HPKE to the sealing key bound
into the quote (:mod:`teeshard.attest.sealing`); an ingress outside the TEE sees
only ciphertext. The node opens it, refuses it outside the time window or when
seen before (:class:`~teeshard.attest.replay.ReplayCache`), and runs the inner
request against its own API in process (ASGI, never a socket) with:

* ``Authorization: Bearer <the sealed key>``: an outer Authorization header is
  refused, since the ingress would have read it;
* ``Idempotency-Key: <hex SHA-256 of the sealed request>``: billing charges one
  sealed request once, even across entry processes that share a ledger.

The inner response streams back as it is produced, one sealed record per body
chunk (:mod:`teeshard.attest.sealed_stream`), so a streamed completion arrives
token by token. The outer status is 200 whatever the inner one: that, too, is
inside the seal.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.responses import StreamingResponse
from starlette.types import Message

from teeshard.attest import (
    IDEMPOTENCY_HEADER,
    SEALED_CONTENT_TYPE,
    SEALED_PATH,
    SEALED_STREAM_TYPE,
    NodeIdentity,
    OpenedRequest,
    ReplayCache,
    ReplayCacheFull,
    ReplayedRequest,
    SealingError,
    StaleRequest,
    open_request,
)
from teeshard.attest.sealing import MAX_SEALED_BYTES, WINDOW_S
from teeshard.entry.errors import APIError

SEALABLE_PATHS = ("/v1/chat/completions", "/v1/completions", "/generate")
_QUEUE_MESSAGES = 16  # inner body chunks buffered before the generation waits for the client


def attach_sealed_router(
    app: FastAPI,
    identity: NodeIdentity | Callable[[], Sequence[NodeIdentity]],
    *,
    window_s: float = WINDOW_S,
    replay_cache: ReplayCache | None = None,
) -> None:
    """Serve ``/v1/sealed`` on ``app``, opening requests with ``identity``'s sealing key.

    ``identity`` may be a getter of the identities to try, newest first, for a node
    that re-keys while it runs (a request sealed just before a re-key still opens).
    """
    router = APIRouter()
    replays = replay_cache or ReplayCache(window_s)
    current = identity if callable(identity) else (lambda: (identity,))

    @router.post(SEALED_PATH)
    async def sealed(request: Request) -> Response:
        if request.headers.get("content-type", "").split(";")[0].strip() != SEALED_CONTENT_TYPE:
            raise APIError(415, f"sealed requests must be sent as {SEALED_CONTENT_TYPE}")
        if "authorization" in request.headers:
            raise APIError(
                400,
                "a sealed request carries its API key inside the seal: send no Authorization "
                "header (the ingress can read it)",
                code="sealed_request_invalid",
            )
        opened = await _open(request, current())
        try:
            replays.admit(opened.request_id, opened.timestamp, time.time())
        except StaleRequest as exc:
            raise APIError(400, str(exc), code="sealed_request_expired") from None
        except ReplayedRequest as exc:
            raise APIError(409, str(exc), code="sealed_request_replayed") from None
        except ReplayCacheFull as exc:
            raise APIError(503, str(exc), code="sealed_requests_busy") from None
        if opened.path not in SEALABLE_PATHS:
            raise APIError(
                400, f"{opened.path} cannot be sealed (use one of {', '.join(SEALABLE_PATHS)})"
            )
        return await _forward(app, request, opened)

    app.include_router(router)


async def _open(request: Request, identities: Sequence[NodeIdentity]) -> OpenedRequest:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_SEALED_BYTES:
        raise APIError(413, f"sealed requests are at most {MAX_SEALED_BYTES} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_SEALED_BYTES:
            raise APIError(413, f"sealed requests are at most {MAX_SEALED_BYTES} bytes")
    failure: SealingError | None = None
    for identity in identities:
        try:
            return open_request(identity, bytes(body))
        except SealingError as exc:
            failure = failure or exc  # the newest key's reason is the one to report
    raise APIError(
        400, f"sealed request rejected: {failure}", code="sealed_request_invalid"
    ) from None


def _inner_scope(request: Request, opened: OpenedRequest) -> dict[str, Any]:
    headers = [
        (b"host", b"entry.internal"),
        (b"content-type", b"application/json"),
        (b"content-length", str(len(opened.body)).encode()),
        (IDEMPOTENCY_HEADER.lower().encode(), opened.idempotency_key.encode()),
    ]
    if opened.api_key is not None:
        headers.append((b"authorization", f"Bearer {opened.api_key}".encode()))
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": opened.path,
        "raw_path": opened.path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": request.scope.get("client"),
        "server": ("entry.internal", 80),
        "state": dict(request.scope.get("state") or {}),
    }


async def _forward(app: FastAPI, request: Request, opened: OpenedRequest) -> Response:
    """Run the inner request in process; stream its response back as sealed records."""
    # Unbounded, so the end marker can always be put; back-pressure is the semaphore:
    # a generation waits once _QUEUE_MESSAGES chunks are waiting for a slow client.
    queue: asyncio.Queue[Message | None] = asyncio.Queue()
    room = asyncio.Semaphore(_QUEUE_MESSAGES)
    gone = asyncio.Event()  # the outer response is over: the inner one sees a disconnect
    delivered = False

    async def receive() -> Message:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": opened.body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        await room.acquire()
        queue.put_nowait(message)

    async def next_message() -> Message | None:
        message = await queue.get()
        if message is not None:
            room.release()
        return message

    async def run() -> None:
        try:
            await app(_inner_scope(request, opened), receive, send)
        finally:
            queue.put_nowait(None)

    task = asyncio.create_task(run())
    start = await next_message()
    if start is None or start["type"] != "http.response.start":
        await _finish(task, gone)
        raise APIError(500, "the sealed request's inner response did not start")
    content_type = next(
        (v.decode() for k, v in start.get("headers", []) if k.lower() == b"content-type"),
        "application/octet-stream",
    )
    sealer = opened.response_sealer()

    async def records() -> AsyncIterator[bytes]:
        try:
            yield sealer.head(int(start["status"]), content_type)
            while (message := await next_message()) is not None:
                if message["type"] != "http.response.body":
                    continue
                more = bool(message.get("more_body", False))
                data = bytes(message.get("body", b""))
                if data or not more:
                    yield sealer.data(data, final=not more)
                if not more:
                    return
            # the inner app ended without a last body message: cut short, and the client sees it
        finally:
            await _finish(task, gone)

    return StreamingResponse(
        records(),
        media_type=SEALED_STREAM_TYPE,
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _finish(task: asyncio.Task[None], gone: asyncio.Event) -> None:
    """Let the inner request end (a client gone is a disconnect to it), then reap it."""
    gone.set()
    if not task.done():
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout=5)
        except (TimeoutError, asyncio.CancelledError):
            task.cancel()
    with contextlib.suppress(BaseException):
        await task
