"""HPKE sealed requests: round trip through a real HTTP client, and tampering rejected."""

from __future__ import annotations

import json
import secrets

import httpx
import pytest

from teeshard.attest.attester import NodeAttestation
from teeshard.attest.client import ATTESTATION_PATH, SealedClient
from teeshard.attest.errors import FormatError, SealingError, SimulatedRefused
from teeshard.attest.evidence import Bundle
from teeshard.attest.manifest import ShardManifest
from teeshard.attest.sealing import SEALED_CONTENT_TYPE, SEALED_PATH, open_request, seal_request
from teeshard.attest.verify.policy import Policy
from tests.attest.helpers import NodeFactory


@pytest.fixture
def entry(make_node: NodeFactory, manifests: dict[str, ShardManifest]) -> NodeAttestation:
    return make_node(manifests["0:2"])


def test_round_trip(entry: NodeAttestation) -> None:
    identity = entry.identity
    sealed, opener = seal_request(
        identity.fingerprint, identity.sealing_public_key, "/v1/chat/completions", b'{"a": 1}'
    )
    assert b'{"a": 1}' not in sealed and b"/v1/chat" not in sealed
    opened = open_request(identity, sealed)
    assert opened.path == "/v1/chat/completions" and opened.body == b'{"a": 1}'
    answer = opener.open_response(opened.seal_response(200, b'{"ok": true}'))
    assert answer.status == 200 and answer.body == b'{"ok": true}'


def test_streamed_chunks_in_order_only(entry: NodeAttestation) -> None:
    identity = entry.identity
    sealed, opener = seal_request(identity.fingerprint, identity.sealing_public_key, "/s", b"")
    opened = open_request(identity, sealed)
    chunks = [opened.seal_chunk(i, f"data {i}".encode(), i == 2) for i in range(3)]
    with pytest.raises(SealingError, match="chunk 0"):
        opener.open_chunk(chunks[1])  # out of order
    assert opener.open_chunk(chunks[0]) == (b"data 0", False)
    assert opener.open_chunk(chunks[1]) == (b"data 1", False)
    assert opener.open_chunk(chunks[2]) == (b"data 2", True)
    with pytest.raises(SealingError, match="after the final"):
        opener.open_chunk(chunks[2])


@pytest.mark.parametrize("offset", [0, 31, 32, 40, -1])
def test_tampered_request_is_rejected(entry: NodeAttestation, offset: int) -> None:
    identity = entry.identity
    sealed, _ = seal_request(identity.fingerprint, identity.sealing_public_key, "/p", b"body")
    tampered = bytearray(sealed)
    tampered[offset] ^= 0x01
    with pytest.raises(SealingError):
        open_request(identity, bytes(tampered))
    with pytest.raises(SealingError):
        open_request(identity, sealed[:-1])


@pytest.mark.parametrize("offset", [0, 33, -1])
def test_tampered_response_is_rejected(entry: NodeAttestation, offset: int) -> None:
    identity = entry.identity
    sealed, opener = seal_request(identity.fingerprint, identity.sealing_public_key, "/p", b"b")
    response = bytearray(open_request(identity, sealed).seal_response(200, b"answer"))
    response[offset] ^= 0x01
    with pytest.raises(SealingError):
        opener.open_response(bytes(response))


def test_response_to_another_request_is_rejected(entry: NodeAttestation) -> None:
    identity = entry.identity
    _, opener = seal_request(identity.fingerprint, identity.sealing_public_key, "/p", b"1")
    second, _ = seal_request(identity.fingerprint, identity.sealing_public_key, "/p", b"2")
    other = open_request(identity, second)
    with pytest.raises(SealingError):
        opener.open_response(other.seal_response(200, b"not yours"))


def test_request_for_another_node_does_not_open(
    entry: NodeAttestation, make_node: NodeFactory, manifests: dict[str, ShardManifest]
) -> None:
    other = make_node(manifests["0:2"])
    sealed, _ = seal_request(
        entry.identity.fingerprint, entry.identity.sealing_public_key, "/p", b"x"
    )
    with pytest.raises(SealingError):
        open_request(other.identity, sealed)
    # The right key but bound to another certificate fingerprint: refused too.
    misbound, _ = seal_request(
        other.identity.fingerprint, entry.identity.sealing_public_key, "/p", b"x"
    )
    with pytest.raises(SealingError):
        open_request(entry.identity, misbound)


def node_transport(node: NodeAttestation, seen: list[bytes]) -> httpx.MockTransport:
    """The node's two endpoints, served in-process; ``seen`` records what crossed the wire."""

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request.content)
        if request.url.path == ATTESTATION_PATH:
            try:
                return httpx.Response(200, json=node.bundle_json(request.url.params["nonce"]))
            except FormatError as exc:
                return httpx.Response(400, json={"error": str(exc)})
        assert request.url.path == SEALED_PATH
        assert request.headers["content-type"] == SEALED_CONTENT_TYPE
        opened = open_request(node.identity, request.content)
        payload = json.loads(opened.body)
        body = json.dumps({"path": opened.path, "echo": payload["messages"][0]}).encode()
        response = opened.seal_response(200, body)
        seen.append(response)
        return httpx.Response(200, content=response)

    return httpx.MockTransport(handle)


def test_sealed_client_verifies_then_round_trips(entry: NodeAttestation) -> None:
    seen: list[bytes] = []
    http = httpx.Client(transport=node_transport(entry, seen))
    client = SealedClient(
        "https://entry.example",
        Policy(allow_simulated=True),
        expected_manifest_hash=entry.manifest.combined_hash,
        http=http,
    )
    secret = "my secret prompt " + secrets.token_hex(8)
    status, body = client.post_json("/v1/chat/completions", {"messages": [secret]})
    assert status == 200
    assert body == {"path": "/v1/chat/completions", "echo": secret}
    assert client.node is not None and client.node.insecure
    # What an ingress would see: no plaintext in either direction.
    assert seen and not any(secret.encode() in blob for blob in seen)


def test_sealed_client_refuses_unverified_nodes(entry: NodeAttestation) -> None:
    http = httpx.Client(transport=node_transport(entry, []))
    client = SealedClient(
        "https://entry.example", Policy(), expected_manifest_hash=bytes(32), http=http
    )
    with pytest.raises(SimulatedRefused):
        client.post_json("/v1/chat/completions", {"messages": ["x"]})


def test_bundle_fetched_through_the_transport_parses(entry: NodeAttestation) -> None:
    http = httpx.Client(transport=node_transport(entry, []))
    nonce = secrets.token_bytes(16)
    response = http.get(f"https://e.example{ATTESTATION_PATH}", params={"nonce": nonce.hex()})
    assert Bundle.loads(response.content).nonce == nonce
