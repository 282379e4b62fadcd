"""Item 16: a node (or anyone in its place) cannot make a verifier read without end.

A real HTTP server on loopback answers the attestation endpoints with oversized
bodies: declared by Content-Length, or streamed with no length at all, or a huge
event log inside a well-formed bundle, or a compressed body. Every fetch refuses
with a clear error and stops reading: the server manages to send only a small
part of what it tries to.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from teeshard.attest.attester import NodeAttestation
from teeshard.attest.client import (
    MAX_BUNDLE_BYTES,
    fetch_bundle,
    fetch_bundle_async,
    fetch_chain,
    fetch_chain_async,
)
from teeshard.attest.errors import EventLogError, FormatError
from teeshard.attest.manifest import ShardManifest
from teeshard.attest.verify.dstack_eventlog import MAX_EVENT_LOG_BYTES, verify_event_log
from tests.attest.helpers import NodeFactory

FLOOD_BYTES = 64 << 20  # what the hostile server tries to make the client read
CHUNK = 64 << 10


@dataclass
class Answer:
    mode: str = "stream"  # "declared", "stream", "event-log", "gzip"
    body: bytes = b""
    sent: int = 0


class Handler(BaseHTTPRequestHandler):
    answer: Answer  # set on the class by the fixture

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        answer = self.answer
        self.send_response(200)
        self.send_header("content-type", "application/json")
        if answer.mode in ("event-log", "gzip"):
            if answer.mode == "gzip":
                self.send_header("content-encoding", "gzip")
            self.send_header("content-length", str(len(answer.body)))
            self.end_headers()
            self.wfile.write(answer.body)
            return
        if answer.mode == "declared":
            self.send_header("content-length", str(FLOOD_BYTES))
        else:
            self.send_header("connection", "close")  # no length: read until the server closes
        self.end_headers()
        self.flood(answer)

    def flood(self, answer: Answer) -> None:
        # Valid JSON as far as it goes: nothing but the size is wrong with it.
        chunk = b'{"bundles": [' + b" " * (CHUNK - 13)
        try:
            while answer.sent < FLOOD_BYTES:
                self.wfile.write(chunk)
                answer.sent += len(chunk)
                chunk = b" " * CHUNK
        except (BrokenPipeError, ConnectionResetError):
            pass


@pytest.fixture
def hostile() -> Iterator[tuple[str, Answer]]:
    answer = Answer()
    handler = type("BoundHandler", (Handler,), {"answer": answer})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", answer
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


NONCE = bytes(32)
# kernel socket buffers on loopback hold a few MiB; the client reads at most its cap
READ_BOUND = 24 << 20


@pytest.mark.parametrize("mode", ["declared", "stream"])
def test_oversized_bundle_is_refused_unread(hostile: tuple[str, Answer], mode: str) -> None:
    url, answer = hostile
    answer.mode = mode
    with pytest.raises(FormatError, match=r"bytes|larger than"):
        fetch_bundle(url, NONCE, timeout=10)
    assert answer.sent < READ_BOUND


@pytest.mark.parametrize("mode", ["declared", "stream"])
def test_oversized_chain_is_refused_unread(hostile: tuple[str, Answer], mode: str) -> None:
    url, answer = hostile
    answer.mode = mode
    with pytest.raises(FormatError, match=r"bytes|larger than"):
        fetch_chain(url, NONCE, timeout=10, max_bytes=MAX_BUNDLE_BYTES)
    assert answer.sent < READ_BOUND


def test_async_fetches_are_capped_too(hostile: tuple[str, Answer]) -> None:
    url, answer = hostile

    async def both() -> None:
        with pytest.raises(FormatError, match="larger than"):
            await fetch_bundle_async(url, NONCE, http_timeout_s=10)
        with pytest.raises(FormatError, match="larger than"):
            await fetch_chain_async(url, NONCE, http_timeout_s=10, max_bytes=MAX_BUNDLE_BYTES)

    asyncio.run(both())
    assert answer.sent < 2 * READ_BOUND


def test_oversized_event_log_is_refused(
    hostile: tuple[str, Answer], make_node: NodeFactory, manifests: dict[str, ShardManifest]
) -> None:
    """A bundle under the size cap whose event log alone is over its own cap."""
    node: NodeAttestation = make_node(manifests["0:2"])
    data = node.bundle(NONCE).to_json()
    data["evidence"]["event_log"] = "[" + " " * MAX_EVENT_LOG_BYTES + "]"
    url, answer = hostile
    answer.mode = "event-log"
    answer.body = json.dumps(data).encode()
    with pytest.raises(FormatError, match="event log"):
        fetch_bundle(url, NONCE)
    answer.body = json.dumps({"bundles": [data]}).encode()
    with pytest.raises(FormatError, match="event log"):
        fetch_chain(url, NONCE)
    # and offline, where no client stood in between
    with pytest.raises(EventLogError, match="refused"):
        verify_event_log(data["evidence"]["event_log"], bytes(48))


def test_compressed_answers_are_refused(hostile: tuple[str, Answer]) -> None:
    """Raw bytes are what is counted, so an answer that would inflate is not taken."""
    url, answer = hostile
    answer.mode = "gzip"
    answer.body = b"\x1f\x8b" + bytes(30)
    with pytest.raises(FormatError, match="gzip-encoded"):
        fetch_bundle(url, NONCE)


def test_a_normal_bundle_still_comes_through(
    hostile: tuple[str, Answer], make_node: NodeFactory, manifests: dict[str, ShardManifest]
) -> None:
    node = make_node(manifests["0:2"])
    url, answer = hostile
    answer.mode = "event-log"  # a fixed body
    answer.body = node.bundle(NONCE).dumps().encode()
    assert fetch_bundle(url, NONCE).certificate_pem == node.identity.certificate_pem
