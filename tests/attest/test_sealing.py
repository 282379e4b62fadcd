"""HPKE sealed requests: the key inside, time window and replay cache, sealed streams.

Attacks (issue 8, item 7): an ingress reading the API key; a captured request
replayed; a sealed answer truncated, reordered or altered in flight. Each fails.
"""

from __future__ import annotations

import json
import secrets

import httpx
import pytest

from teeshard.attest.attester import NodeAttestation
from teeshard.attest.client import ATTESTATION_PATH
from teeshard.attest.errors import (
    FormatError,
    ReplayCacheFull,
    ReplayedRequest,
    SealingError,
    SimulatedRefused,
    StaleRequest,
)
from teeshard.attest.evidence import Bundle
from teeshard.attest.manifest import ShardManifest
from teeshard.attest.replay import ReplayCache, check_time
from teeshard.attest.sealed_client import SealedClient
from teeshard.attest.sealed_stream import BUCKETS, MAX_RECORD_DATA, ResponseReader
from teeshard.attest.sealing import SEALED_CONTENT_TYPE, SEALED_PATH, open_request, seal_request
from teeshard.attest.verify.policy import Policy
from tests.attest.helpers import NodeFactory

KEY = "tsk_" + "k" * 24


@pytest.fixture
def entry(make_node: NodeFactory, manifests: dict[str, ShardManifest]) -> NodeAttestation:
    return make_node(manifests["0:2"])


def test_round_trip_with_the_key_inside(entry: NodeAttestation) -> None:
    identity = entry.identity
    sealed, reader = seal_request(identity.fingerprint, identity.sealing_public_key,
                                  "/v1/chat/completions", b'{"a": 1}', api_key=KEY, now=1000)  # fmt: skip
    assert b'{"a": 1}' not in sealed and b"/v1/chat" not in sealed and KEY.encode() not in sealed
    opened = open_request(identity, sealed)
    assert opened.path == "/v1/chat/completions" and opened.body == b'{"a": 1}'
    assert opened.api_key == KEY and opened.timestamp == 1000 and len(opened.request_id) == 16
    assert opened.idempotency_key == reader.request_digest.hex()
    assert KEY not in repr(opened)
    sealer = opened.response_sealer()
    answer = reader.open_all(sealer.head(200, "application/json") + sealer.final(b'{"ok": true}'))
    assert (answer.status, answer.content_type, answer.body) == (
        200,
        "application/json",
        b'{"ok": true}',
    )
    again = open_request(identity, seal_request(identity.fingerprint, identity.sealing_public_key,
                                                "/p", b"")[0])  # fmt: skip
    assert again.api_key is None and again.request_id != opened.request_id


def sealed_stream(entry: NodeAttestation, parts: list[bytes]) -> tuple[list[bytes], ResponseReader]:
    """The records of a sealed answer: head, one per part, the last one final."""
    identity = entry.identity
    sealed, reader = seal_request(identity.fingerprint, identity.sealing_public_key, "/s", b"")
    sealer = open_request(identity, sealed).response_sealer()
    records = [sealer.head(200, "text/event-stream")]
    records += [sealer.data(p, final=i == len(parts) - 1) for i, p in enumerate(parts)]
    return records, reader


def test_stream_opens_record_by_record_across_any_split(entry: NodeAttestation) -> None:
    parts = [b"data: one\n\n", b"data: two\n\n", b"x" * (MAX_RECORD_DATA + 10)]
    records, reader = sealed_stream(entry, parts)
    wire = b"".join(records)
    opened = []
    for i in range(0, len(wire), 7):  # as TCP might deliver it
        opened += list(reader.feed(wire[i : i + 7]))
    reader.close()
    assert reader.status == 200 and reader.content_type == "text/event-stream"
    assert b"".join(opened) == b"".join(parts) and opened[:2] == parts[:2]


def test_record_lengths_reveal_only_their_bucket(entry: NodeAttestation) -> None:
    records, _ = sealed_stream(entry, [b"a", b"b" * 200, b"c" * 251, b"d" * 300])
    lengths = [len(r) - 4 for r in records]
    assert lengths[:4] == [BUCKETS[0] + 16] * 4 and lengths[4] == BUCKETS[1] + 16


def test_attack_truncated_stream_fails(entry: NodeAttestation) -> None:
    records, reader = sealed_stream(entry, [b"Take one pill", b" and never more.", b""])
    with pytest.raises(SealingError, match="cut short"):
        reader.open_all(b"".join(records[:-1]))  # the final record dropped
    records, reader = sealed_stream(entry, [b"a", b"b"])
    with pytest.raises(SealingError, match="cut short"):
        reader.open_all(b"".join(records)[:-3])  # the last record cut in the middle


def test_attack_reordered_or_replayed_records_fail(entry: NodeAttestation) -> None:
    records, reader = sealed_stream(entry, [b"first", b"second", b"third"])
    with pytest.raises(SealingError, match="record 1 does not open"):
        reader.open_all(records[0] + records[2] + records[1] + records[3])
    records, reader = sealed_stream(entry, [b"first", b"last"])
    with pytest.raises(SealingError, match="record 2 does not open"):
        reader.open_all(records[0] + records[1] + records[1] + records[2])
    records, reader = sealed_stream(entry, [b"only"])
    with pytest.raises(SealingError, match="after the final"):
        reader.open_all(b"".join(records) + records[1])


@pytest.mark.parametrize("offset", [0, 3, 4, 30, -1])
def test_attack_altered_record_fails(entry: NodeAttestation, offset: int) -> None:
    records, reader = sealed_stream(entry, [b"the answer"])
    wire = bytearray(b"".join(records))
    wire[len(records[0]) + offset if offset >= 0 else offset] ^= 0x01
    with pytest.raises(SealingError):
        reader.open_all(bytes(wire))


def test_answer_to_another_request_does_not_open(entry: NodeAttestation) -> None:
    identity = entry.identity
    _, reader = seal_request(identity.fingerprint, identity.sealing_public_key, "/p", b"1")
    second, _ = seal_request(identity.fingerprint, identity.sealing_public_key, "/p", b"2")
    sealer = open_request(identity, second).response_sealer()
    with pytest.raises(SealingError, match="record 0"):
        reader.open_all(sealer.head(200, "application/json") + sealer.final(b"not yours"))


def test_replay_cache_refuses_a_replay_and_stale_requests() -> None:
    cache = ReplayCache(window_s=120, max_entries=3)
    cache.admit(b"a" * 16, 1000, now=1000)
    with pytest.raises(ReplayedRequest):
        cache.admit(b"a" * 16, 1000, now=1100)  # the captured request, sent again in the window
    with pytest.raises(StaleRequest, match="old"):
        cache.admit(b"a" * 16, 1000, now=1121)  # after it: refused as stale, not forgotten
    with pytest.raises(StaleRequest, match="future"):
        cache.admit(b"b" * 16, 1200, now=1000)
    cache.admit(b"b" * 16, 1010, now=1010)
    cache.admit(b"c" * 16, 1020, now=1020)
    with pytest.raises(ReplayCacheFull):
        cache.admit(b"d" * 16, 1030, now=1030)  # full of live ids: refuse, never forget one
    cache.admit(b"d" * 16, 1125, now=1125)  # a's entry expired at 1120: room again
    assert len(cache) == 3
    check_time(1000, 1000 + 119.5, 120)


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
        seen.append(request.content + b"".join(k + v for k, v in request.headers.raw))
        if request.url.path == ATTESTATION_PATH:
            try:
                return httpx.Response(200, json=node.bundle_json(request.url.params["nonce"]))
            except FormatError as exc:
                return httpx.Response(400, json={"error": str(exc)})
        assert request.url.path == SEALED_PATH
        assert request.headers["content-type"] == SEALED_CONTENT_TYPE
        assert "authorization" not in request.headers
        opened = open_request(node.identity, request.content)
        payload = json.loads(opened.body)
        body = json.dumps(
            {"path": opened.path, "echo": payload["messages"][0], "key": opened.api_key}
        ).encode()
        sealer = opened.response_sealer()
        response = sealer.head(201, "application/json") + sealer.final(body)
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
        api_key=KEY,
    )
    secret = "my secret prompt " + secrets.token_hex(8)
    status, body = client.post_json("/v1/chat/completions", {"messages": [secret]})
    assert status == 201
    assert body == {"path": "/v1/chat/completions", "echo": secret, "key": KEY}
    assert client.node is not None and client.node.insecure
    # What an ingress would see: no plaintext and no key in either direction, headers too.
    assert seen and not any(secret.encode() in blob or KEY.encode() in blob for blob in seen)


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
