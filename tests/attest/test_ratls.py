"""RA-TLS between nodes, end to end on loopback: attest, pin, then talk over wss://.

A downstream node serves its bundle and its pipeline WebSocket on one TLS port, as
the node server does. The upstream side uses :func:`attest_peer` and then
``websockets.connect(..., ssl=peer.ssl_context)``. Refusals leave the downstream
without a single received message.
"""

from __future__ import annotations

import dataclasses
import json
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlsplit

import pytest
import websockets
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.http11 import Request, Response

from teeshard.attest.attester import NodeAttestation
from teeshard.attest.client import attest_peer
from teeshard.attest.errors import ManifestMismatch, SignatureError
from teeshard.attest.evidence import Bundle
from teeshard.attest.identity import NodeIdentity
from teeshard.attest.manifest import ShardManifest
from teeshard.attest.verify.policy import Policy
from tests.attest.helpers import NodeFactory

POLICY = Policy(allow_simulated=True)


@dataclass
class Downstream:
    url: str
    received: list[bytes] = field(default_factory=list)


def serving(
    node: NodeAttestation, alter: Callable[[Bundle], Bundle]
) -> Callable[[ServerConnection, Request], Response | None]:
    def process_request(connection: ServerConnection, request: Request) -> Response | None:
        parts = urlsplit(request.path)
        if parts.path != "/v1/attestation":
            return None  # the WebSocket handshake goes on
        bundle = alter(node.bundle(bytes.fromhex(parse_qs(parts.query)["nonce"][0])))
        return connection.respond(200, json.dumps(bundle.to_json()))

    return process_request


async def start(
    node: NodeAttestation, tls: NodeIdentity, alter: Callable[[Bundle], Bundle] = lambda b: b
) -> tuple[Server, Downstream]:
    received: list[bytes] = []

    async def pipeline(connection: ServerConnection) -> None:
        async for message in connection:
            data = message if isinstance(message, bytes) else message.encode()
            received.append(data)
            await connection.send(b"token:" + data[-1:])

    server = await serve(
        pipeline, "127.0.0.1", 0, ssl=tls.server_ssl_context(),
        process_request=serving(node, alter),
    )  # fmt: skip
    port = next(iter(server.sockets)).getsockname()[1]
    return server, Downstream(f"wss://127.0.0.1:{port}", received)


@pytest.fixture
async def downstream_node(
    make_node: NodeFactory, manifests: dict[str, ShardManifest]
) -> AsyncIterator[tuple[NodeAttestation, Downstream]]:
    node = make_node(manifests["2:3"])
    server, downstream = await start(node, node.identity)
    yield node, downstream
    server.close()
    await server.wait_closed()


async def test_attested_peer_is_pinned_and_reachable(
    downstream_node: tuple[NodeAttestation, Downstream],
) -> None:
    node, downstream = downstream_node
    peer = await attest_peer(
        downstream.url, POLICY, expected_manifest_hash=node.manifest.combined_hash
    )
    assert peer.node.fingerprint == node.identity.fingerprint and peer.ssl_context is not None
    async with websockets.connect(downstream.url + "/pipeline", ssl=peer.ssl_context) as ws:
        await ws.send(b"hidden-state-1")
        assert await ws.recv() == b"token:1"
    assert downstream.received == [b"hidden-state-1"]


async def test_wrong_manifest_is_refused_before_any_data(
    downstream_node: tuple[NodeAttestation, Downstream], manifests: dict[str, ShardManifest]
) -> None:
    _, downstream = downstream_node
    with pytest.raises(ManifestMismatch):
        await attest_peer(
            downstream.url, POLICY, expected_manifest_hash=manifests["0:2"].combined_hash
        )
    assert downstream.received == []


async def test_bad_evidence_signature_is_refused(
    make_node: NodeFactory, manifests: dict[str, ShardManifest]
) -> None:
    node = make_node(manifests["2:3"])

    def corrupt(bundle: Bundle) -> Bundle:
        signature = bytearray(bundle.nonce_signature)
        signature[-1] ^= 1
        return dataclasses.replace(bundle, nonce_signature=bytes(signature))

    server, downstream = await start(node, node.identity, corrupt)
    try:
        with pytest.raises(SignatureError):
            await attest_peer(
                downstream.url, POLICY, expected_manifest_hash=node.manifest.combined_hash
            )
        assert downstream.received == []
    finally:
        server.close()
        await server.wait_closed()


async def test_certificate_other_than_the_attested_one_is_refused(
    make_node: NodeFactory, manifests: dict[str, ShardManifest]
) -> None:
    """A relay serves a genuine node's bundle but terminates TLS with its own key."""
    genuine = make_node(manifests["2:3"])
    relay_tls = NodeIdentity.generate()
    server, downstream = await start(genuine, relay_tls)
    try:
        peer = await attest_peer(
            downstream.url, POLICY, expected_manifest_hash=genuine.manifest.combined_hash
        )
        with pytest.raises(ssl.SSLCertVerificationError):
            async with websockets.connect(downstream.url + "/pipeline", ssl=peer.ssl_context):
                pass
        assert downstream.received == []
    finally:
        server.close()
        await server.wait_closed()
