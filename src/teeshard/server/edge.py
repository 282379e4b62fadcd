"""The HTTP edge of a node process: bounded bodies, slow clients cut off, who sees detail.

- ``BodyLimit`` refuses a body above the limit by its Content-Length before
  reading it, and stops reading a body without one (chunked) as soon as the
  count passes the limit: 413 in the OpenAI error shape either way, plain and
  sealed requests alike. The server keeps serving.
- ``header_deadline_protocol`` is uvicorn's h11 protocol with a deadline for the
  request line and headers, armed when a connection opens and again after each
  response on a kept-alive one: a client that trickles its headers is
  disconnected (uvicorn alone would keep it open for ever). The number of
  connections is bounded by uvicorn's ``limit_concurrency`` (503 beyond it).
- ``may_see_detail``: ``/metrics`` and the detailed ``/health`` tell how busy a
  node is (tokens and steps per request), which would let an ingress size sealed
  requests: they are for the admin token's bearer, or any client of a node that
  binds loopback only and has no ingress in front.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from typing import Any

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from teeshard.entry.protocol import error_body
from teeshard.server.config import NodeConfig, is_loopback


class BodyLimit:
    """ASGI middleware: no request body above ``max_bytes`` is read.

    The body is read here first, counting as it comes (so a chunked body is cut off
    the moment it passes the limit, before the rest is received), and then handed
    to the app as it arrived; the app's later ``receive`` calls (disconnects) pass
    through.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await self._refuse(send)
            return
        buffered: list[Message] = []
        seen = 0
        while True:
            message = await receive()
            buffered.append(message)
            if message["type"] != "http.request":
                break  # the client went away: let the app see it
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                await self._refuse(send)
                return
            if not message.get("more_body", False):
                break

        async def replay() -> Message:
            return buffered.pop(0) if buffered else await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, send: Send) -> None:
        body = json.dumps(
            error_body(
                f"request body is larger than this node's limit of {self.max_bytes} bytes",
                "invalid_request_error",
                code="request_too_large",
            )
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


def header_deadline_protocol(timeout_s: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol, closing connections whose headers do not arrive in time."""

    class HeaderDeadline(H11Protocol):
        _deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def handle_events(self) -> None:
            scope = self.scope
            super().handle_events()
            if self.scope is not scope:  # a request line and headers arrived
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()  # the next request on this connection gets the same deadline

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._disarm()
            self._deadline = self.loop.call_later(timeout_s, self._expire)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _expire(self) -> None:
            self._deadline = None
            if not self.transport.is_closing():
                self.transport.close()

    return HeaderDeadline


def may_see_detail(request: Request, config: NodeConfig) -> bool:
    """Whether this caller may read load and usage detail (metrics, detailed health)."""
    if config.admin_token:
        given = request.headers.get("authorization", "")
        if hmac.compare_digest(given.encode(), f"Bearer {config.admin_token}".encode()):
            return True
    client = request.client.host if request.client is not None else ""
    return config.binds_loopback and not config.behind_ingress and is_loopback(client)


def public_health(insecure: bool) -> dict[str, Any]:
    """What anyone may know: the node is up, and whether its evidence is simulated."""
    return {"status": "ok", "insecure": insecure}
