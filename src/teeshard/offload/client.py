"""The TEE node's side of the accelerator socket: CURVE-pinned, one request at a time.

The node knows the accelerator's public key before it connects (``--accel-key``);
ZeroMQ's CURVE handshake then fails against any other server, and everything on
the wire is encrypted to that key. :meth:`AcceleratorClient.connect` waits for the
handshake and reports a refused one as :class:`AcceleratorUnavailable`, so a wrong
key is a clear error at start, not a hang at the first step.

Replies are checked before use: the id must be the one asked (a reply to an older
request is stale), the shape the group's, the values in range. Anything else is
:class:`AcceleratorMisbehaved`, after which this client refuses to send again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import zmq
from zmq.utils.monitor import recv_monitor_message

from teeshard.offload import field as gf
from teeshard.offload import messages as wire
from teeshard.offload.errors import AcceleratorMisbehaved, AcceleratorUnavailable
from teeshard.offload.keys import KeyPair, fingerprint

log = logging.getLogger(__name__)

_HANDSHAKE_FAILED = (
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
)
FrameObserver = Callable[[bytes], None]


@dataclass
class Traffic:
    requests: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0


class AcceleratorClient:
    def __init__(
        self,
        endpoint: str,
        server_key: bytes,
        *,
        client_keys: KeyPair | None = None,
        timeout_s: float = 60.0,
        observer: FrameObserver | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.server_key = server_key
        self.fingerprint = fingerprint(server_key)
        self.timeout_s = timeout_s
        self.observer = observer  # sees every frame sent (tests: what the accelerator sees)
        self.traffic = Traffic()
        self.info: wire.InfoReply | None = None
        self.distrusted: str | None = None  # why this accelerator may not be used again
        self._lock = threading.Lock()
        self._next_id = 1
        self._abandoned: set[int] = set()
        keys = client_keys or KeyPair.generate()
        self._context = zmq.Context()
        self._sock = self._context.socket(zmq.DEALER)
        self._sock.curve_serverkey = server_key
        self._sock.curve_publickey = keys.public
        self._sock.curve_secretkey = keys.secret
        self._sock.setsockopt(zmq.LINGER, 0)
        self._monitor = self._sock.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_SUCCEEDED | _HANDSHAKE_FAILED | zmq.EVENT_DISCONNECTED
        )
        self._sock.connect(endpoint)

    def connect(self, timeout_s: float = 10.0) -> wire.InfoReply:
        """Wait for the CURVE handshake, then ask what the accelerator serves."""
        deadline = time.monotonic() + timeout_s
        failures: list[str] = []
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                detail = f" ({', '.join(sorted(set(failures)))})" if failures else ""
                raise AcceleratorUnavailable(
                    f"accelerator {self.endpoint}: no CURVE handshake with the pinned key "
                    f"{self.fingerprint[:16]} within {timeout_s:g} s{detail}: wrong key or no server"
                )
            if not self._monitor.poll(int(left * 1000) + 1):
                continue
            event = recv_monitor_message(self._monitor)["event"]
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                break
            failures.append("handshake refused" if event & _HANDSHAKE_FAILED else "disconnected")
        reply = self._call(wire.InfoRequest(id=self._take_id()))
        if not isinstance(reply, wire.InfoReply):
            raise AcceleratorMisbehaved(f"accelerator {self.endpoint}: bad answer to info")
        self.info = reply
        return reply

    def group_shape(self, group: str) -> tuple[int, int]:
        if self.info is None:
            raise AcceleratorUnavailable("accelerator client used before connect()")
        shape = self.info.groups.get(group)
        if shape is None:
            raise AcceleratorMisbehaved(f"accelerator {self.endpoint} does not serve {group}")
        return shape

    def matmul(self, group: str, x: torch.Tensor) -> torch.Tensor:
        return self.start_matmul(group, x)()

    def start_matmul(self, group: str, x: torch.Tensor) -> Callable[[], torch.Tensor]:
        """Send now, receive when the returned function is called (two servers in parallel)."""
        out_features, _ = self.group_shape(group)
        rows = x.shape[0]
        request_id = self._take_id()
        self._send(wire.MatmulRequest(id=request_id, group=group, x=wire.to_wire(x)))
        field_arith = x.dtype == torch.int64

        def receive() -> torch.Tensor:
            reply = self._receive(request_id)
            if not isinstance(reply, wire.ResultReply):
                raise self._distrust(f"answered a product of {group} with {reply.type}")
            try:
                y = wire.from_wire(reply.y, 2)
            except wire.WireError as exc:
                raise self._distrust(f"sent a malformed product of {group}: {exc}") from None
            if tuple(y.shape) != (rows, out_features):
                raise self._distrust(f"returned shape {tuple(y.shape)} for {group}")
            if field_arith and (y.dtype != torch.int64 or bool(((y < 0) | (y >= gf.P)).any())):
                raise self._distrust(f"returned values outside the field for {group}")
            if not field_arith and (y.dtype != torch.float32 or not bool(torch.isfinite(y).all())):
                raise self._distrust(f"returned a non-finite or non-float32 product for {group}")
            return y

        return receive

    def embed(self, tokens: list[int]) -> torch.Tensor:
        reply = self._call(wire.EmbedRequest(id=self._take_id(), tokens=tuple(tokens)))
        if not isinstance(reply, wire.ResultReply):
            raise self._distrust("answered an embedding with " + reply.type)
        y = wire.from_wire(reply.y, 2)
        if y.shape[0] != len(tokens) or y.dtype != torch.float32:
            raise self._distrust(f"returned an embedding of shape {tuple(y.shape)}")
        return y

    def distrust(self, reason: str) -> AcceleratorMisbehaved:
        """Mark the accelerator as misbehaving (a failed check) and return the error to raise."""
        return self._distrust(reason)

    def close(self) -> None:
        self._sock.disable_monitor()
        self._monitor.close(0)
        self._sock.close(0)
        self._context.term()

    # -- internals --

    def _distrust(self, reason: str) -> AcceleratorMisbehaved:
        message = f"accelerator {self.endpoint} (key {self.fingerprint[:16]}) {reason}"
        if self.distrusted is None:
            self.distrusted = message
            log.error("%s: no longer used", message)
        return AcceleratorMisbehaved(message)

    def _take_id(self) -> int:
        with self._lock:
            request_id = self._next_id
            self._next_id += 1
            return request_id

    def _call(
        self, request: wire.InfoRequest | wire.EmbedRequest
    ) -> wire.InfoReply | wire.ResultReply | wire.ErrorReply:
        self._send(request)
        return self._receive(request.id)

    def _send(self, request: wire.InfoRequest | wire.MatmulRequest | wire.EmbedRequest) -> None:
        if self.distrusted is not None:
            raise AcceleratorMisbehaved(f"{self.distrusted}: refusing to use it again")
        frame = wire.encode(request)
        if self.observer is not None:
            self.observer(frame)
        with self._lock:
            self._sock.send(frame, copy=False)
            self.traffic.requests += 1
            self.traffic.bytes_sent += len(frame)

    def _receive(self, request_id: int) -> wire.InfoReply | wire.ResultReply | wire.ErrorReply:
        deadline = time.monotonic() + self.timeout_s
        while True:
            left = deadline - time.monotonic()
            with self._lock:
                ready = left > 0 and self._sock.poll(int(left * 1000) + 1)
                frame = self._sock.recv() if ready else None
            if frame is None:
                self._abandoned.add(request_id)
                raise AcceleratorUnavailable(
                    f"accelerator {self.endpoint}: no answer within {self.timeout_s:g} s"
                )
            self.traffic.bytes_received += len(frame)
            try:
                reply = wire.decode_reply(frame)
            except wire.WireError as exc:
                raise self._distrust(f"sent an invalid frame: {exc}") from None
            if reply.id in self._abandoned:
                self._abandoned.discard(reply.id)
                continue  # the late answer to a request that already timed out
            if reply.id != request_id:
                raise self._distrust(f"answered request {reply.id} when {request_id} was asked")
            if isinstance(reply, wire.ErrorReply):
                raise AcceleratorUnavailable(f"accelerator {self.endpoint}: {reply.message}")
            return reply
