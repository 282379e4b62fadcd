"""One persistent WebSocket to a downstream node, multiplexed by request id.

Every connection starts with a handshake in which this side proves what it is:
the downstream sends a fresh challenge, and ``introduce`` (the node's trust,
see ``teeshard.server.trust``) answers with an attestation bundle bound to that
challenge and to the downstream's certificate; only then is anything else
sent. Requests from many sessions share the connection; a reader task matches
each reply to its waiting request. When the connection drops, every waiting
request fails at once with ``PeerError`` (no hangs) and the next request
reconnects.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

import websockets
from websockets.asyncio.client import ClientConnection, connect

from teeshard.transport.codec import ProtocolError, decode, encode
from teeshard.transport.messages import (
    ChallengeMsg,
    ErrorMsg,
    IntroduceMsg,
    Reply,
    Request,
    ResultMsg,
)

log = logging.getLogger(__name__)

# Called before each (re)connection; returns the TLS context to use, or None for
# plain ws://. This is where attestation checks and certificate pinning plug in.
ConnectHook = Callable[[], Awaitable[ssl.SSLContext | None]]
# Answers the downstream's challenge: (challenge nonce, the downstream's certificate
# in DER as this connection saw it) -> this node's attestation bundle as JSON bytes.
Introducer = Callable[[bytes, bytes], Awaitable[bytes]]


class PeerError(ConnectionError):
    """The downstream node is unreachable, or the connection broke mid-request."""


class PeerCertificateError(PeerError):
    """The peer's TLS certificate is not the one its attestation named: refused."""


class PeerRefusedError(PeerError):
    """The downstream refused this node's introduction (its attestation): not retried."""


class RemoteError(RuntimeError):
    """The downstream node answered with an error message."""

    def __init__(self, reply: ErrorMsg) -> None:
        super().__init__(reply.message)
        self.code = reply.code
        self.status = reply.status
        self.node = reply.node


class PeerClient:
    def __init__(
        self,
        url: str,
        max_frame_bytes: int,
        connect_timeout: float = 10.0,
        request_timeout: float = 300.0,
        on_connect: ConnectHook | None = None,
        introduce: Introducer | None = None,
    ) -> None:
        self.url = url
        self.introduce = introduce
        self.max_frame_bytes = max_frame_bytes
        self.connect_timeout = connect_timeout
        self.request_timeout = request_timeout
        self.on_connect = on_connect
        self._ids = itertools.count(1)
        self._conn: ClientConnection | None = None
        self._reader: asyncio.Task[None] | None = None
        self._pending: dict[int, asyncio.Future[Reply]] = {}
        self._connect_lock = asyncio.Lock()

    def next_id(self) -> int:
        return next(self._ids)

    @property
    def connected(self) -> bool:
        return self._conn is not None

    async def request(
        self, build: Callable[[int], Request], on_frame: Callable[[bytes], None] | None = None
    ) -> ResultMsg:
        """Send ``build(request_id)`` and wait for its reply.

        ``on_frame`` sees the exact bytes sent (receipts hash what travelled).

        Raises ``PeerError`` when the peer cannot be reached or the link breaks,
        ``RemoteError`` when the peer answers with an error.
        """
        conn = await self._ensure_connected()
        request_id = self.next_id()
        waiter: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = waiter
        try:
            frame = encode(build(request_id))
            if on_frame is not None:
                on_frame(frame)
            await conn.send(frame)
            reply = await asyncio.wait_for(waiter, self.request_timeout)
        except TimeoutError:
            raise PeerError(
                f"{self.url} did not answer within {self.request_timeout:.0f}s"
            ) from None
        except websockets.ConnectionClosed as exc:
            raise PeerError(f"connection to {self.url} closed: {exc}") from None
        finally:
            self._pending.pop(request_id, None)
        if isinstance(reply, ErrorMsg):
            raise RemoteError(reply)
        return reply

    async def connect(self) -> None:
        """Connect now rather than at the first request."""
        await self._ensure_connected()

    async def _ensure_connected(self) -> ClientConnection:
        if self._conn is not None:
            return self._conn
        async with self._connect_lock:
            if self._conn is not None:
                return self._conn
            tls = await self.on_connect() if self.on_connect is not None else None
            try:
                conn = await asyncio.wait_for(
                    connect(
                        self.url,
                        ssl=tls,
                        max_size=self.max_frame_bytes,
                        compression=None,  # hidden states do not compress; deflate only costs time
                        ping_interval=20,
                        ping_timeout=20,
                        open_timeout=self.connect_timeout,
                    ),
                    self.connect_timeout,
                )
            except ssl.SSLCertVerificationError as exc:
                raise PeerCertificateError(
                    f"{self.url} presented a TLS certificate other than the attested one: {exc}"
                ) from None
            except (
                OSError,
                TimeoutError,
                websockets.InvalidHandshake,
                websockets.InvalidURI,
            ) as exc:
                raise PeerError(f"cannot connect to {self.url}: {exc}") from None
            try:
                await introduce_over(conn, self.introduce, self.connect_timeout, self.url)
            except BaseException:
                with contextlib.suppress(Exception):
                    await conn.close()
                raise
            self._conn = conn
            log.info("connected to downstream node %s", self.url)
            self._reader = asyncio.create_task(self._read_loop(conn))
            return conn

    async def _read_loop(self, conn: ClientConnection) -> None:
        reason = "connection closed"
        try:
            async for frame in conn:
                try:
                    message = decode(frame if isinstance(frame, bytes) else frame.encode())
                except ProtocolError as exc:
                    reason = f"downstream sent an invalid frame: {exc}"
                    break
                if not isinstance(message, ResultMsg | ErrorMsg) or message.id is None:
                    if isinstance(message, ErrorMsg):
                        reason = f"downstream error: {message.message}"
                        break
                    continue
                waiter = self._pending.get(message.id)
                if waiter is not None and not waiter.done():
                    waiter.set_result(message)
        except websockets.ConnectionClosed as exc:
            reason = f"connection closed ({exc})"
        finally:
            self._conn = None
            self._fail_pending(reason)
            with contextlib.suppress(Exception):
                await conn.close()

    def _fail_pending(self, reason: str) -> None:
        if self._pending:
            log.warning(
                "link to %s lost with %d requests waiting: %s", self.url, len(self._pending), reason
            )
        for waiter in self._pending.values():
            if not waiter.done():
                waiter.set_exception(PeerError(f"{self.url}: {reason}"))

    async def disconnect(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.close()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader

    def stats(self) -> dict[str, Any]:
        return {"url": self.url, "connected": self.connected, "in_flight": len(self._pending)}


async def introduce_over(
    conn: ClientConnection, introduce: Introducer | None, deadline_s: float, url: str
) -> None:
    """The upstream side of the handshake on a fresh connection (see the module docstring).

    Raises ``PeerRefusedError`` when the downstream refuses the introduction and
    ``PeerError`` when the exchange breaks or times out.
    """
    try:
        challenge = decode(_binary(await asyncio.wait_for(conn.recv(), deadline_s)))
        if not isinstance(challenge, ChallengeMsg):
            raise PeerError(f"{url} did not open with a challenge")
        if introduce is None:
            raise PeerRefusedError(f"{url} accepts only attested upstreams; this client has none")
        ssl_object = conn.transport.get_extra_info("ssl_object")
        peer = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else b""
        bundle = await introduce(challenge.nonce, peer or b"")
        await conn.send(encode(IntroduceMsg(bundle=bundle)))
        answer = decode(_binary(await asyncio.wait_for(conn.recv(), deadline_s)))
    except TimeoutError:
        raise PeerError(f"{url} did not finish the handshake within {deadline_s:.0f}s") from None
    except ProtocolError as exc:
        raise PeerError(f"{url} broke the handshake: {exc}") from None
    except websockets.ConnectionClosed as exc:
        raise PeerRefusedError(f"{url} closed the connection during the handshake: {exc}") from None
    if isinstance(answer, ErrorMsg):
        raise PeerRefusedError(f"{url} refused this node: {answer.message}")
    if not isinstance(answer, ResultMsg):
        raise PeerError(f"{url} answered the introduction with a {answer.type} message")


def _binary(frame: str | bytes) -> bytes:
    if isinstance(frame, str):
        raise ProtocolError("pipeline frames must be binary")
    return frame
