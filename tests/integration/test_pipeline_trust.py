"""Attacks on the pipeline socket, each of which worked before the mutual handshake.

A stranger reaching a node's pipeline socket used to run the model on it (the
entry node served one too, plain and unauthenticated); anyone knowing a session
id could step into or close another user's session; one connection could fill
the session table and flood a node with frames. Each test below reproduces one
attack against real nodes on loopback and checks it now fails, with the node
still serving.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from teeshard.node import PipelineLimits, SessionLimits
from teeshard.server.trust import NodeTrust
from teeshard.transport.codec import decode, encode
from teeshard.transport.messages import ChallengeMsg, IntroduceMsg
from teeshard.transport.peer import PeerRefusedError, introduce_over
from tests.checkpoints import TinyModel, build_tiny_model
from tests.cluster import LocalCluster, RunningNode, attested_stand_in
from tests.integration.test_bad_input import assert_still_serving
from tests.pipeline_socket import PipelineSocket, hidden


@pytest.fixture(scope="module")
def cluster(tiny_llama: TinyModel) -> Iterator[LocalCluster]:
    limits = SessionLimits(max_sessions=8, max_sessions_per_peer=3, unstepped_timeout_s=0.5)
    with LocalCluster(
        tiny_llama.path, 3, limits=limits, pipeline=PipelineLimits(handshake_timeout_s=0.5)
    ) as running:
        yield running


def refused_total(node: RunningNode, reason: str) -> float:
    for line in node.get("/metrics").text.splitlines():
        if line.startswith("teeshard_pipeline_refused_total{") and f'reason="{reason}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def open_sessions(node: RunningNode) -> int:
    return int(node.get("/health").json()["sessions"]["open"])


# -- who may connect -------------------------------------------------------------------


async def test_the_entry_node_serves_no_pipeline_socket(cluster: LocalCluster) -> None:
    """Tokens enter only through the entry's API: its socket is simply not there."""
    with pytest.raises(InvalidStatus) as refused:
        async with connect(cluster.entry.ws_url.replace("wss://", "ws://")):
            pass
    assert refused.value.response.status_code in (403, 404)
    assert_still_serving(cluster)


async def test_a_stranger_is_refused_before_any_frame(cluster: LocalCluster) -> None:
    middle = cluster.nodes[1]
    before = refused_total(middle, "bad_introduction")
    async with PipelineSocket.to(cluster, 1, introduce=False) as stranger:
        challenge = decode(await stranger.ws.recv())
        assert isinstance(challenge, ChallengeMsg)
        _, frame = stranger.open_frame(16)
        reply = await stranger.send_raw(frame)  # what the attack did: open a session
        assert reply["type"] == "error" and reply["code"] == "attestation_failed"
        assert reply["status"] == 403 and "introduce" in reply["message"]
        with pytest.raises(ConnectionClosed) as closed:
            await stranger.ws.recv()
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
    assert open_sessions(middle) == 0
    assert refused_total(middle, "bad_introduction") == before + 1
    assert_still_serving(cluster)


async def test_a_client_that_never_introduces_itself_is_cut_off(cluster: LocalCluster) -> None:
    middle = cluster.nodes[1]
    before = refused_total(middle, "timeout")
    async with PipelineSocket.to(cluster, 1, introduce=False) as silent:
        await silent.ws.recv()  # the challenge; then say nothing
        with pytest.raises(ConnectionClosed):
            while True:
                await asyncio.wait_for(silent.ws.recv(), 5)
    assert refused_total(middle, "timeout") == before + 1


async def test_an_upstream_serving_other_weights_is_refused(
    cluster: LocalCluster, tmp_path_factory: pytest.TempPathFactory
) -> None:
    other = build_tiny_model("llama", tmp_path_factory.mktemp("other"), seed=99)
    impostor = attested_stand_in(
        other.path, cluster.nodes[0].config.layers, cluster.nodes[1].config.policy_path
    )
    before = refused_total(cluster.nodes[1], "attestation_failed")
    with pytest.raises(PeerRefusedError, match=r"manifest hash .* is not the expected"):
        await _introduce(cluster, 1, impostor)
    assert refused_total(cluster.nodes[1], "attestation_failed") == before + 1


async def test_an_upstream_for_other_layers_is_refused(cluster: LocalCluster) -> None:
    """A genuine node of this very model, but not the one right before: no skipping layers."""
    first = cluster.nodes[0].config.layers
    genuine_elsewhere = attested_stand_in(
        cluster.model_dir, first, cluster.nodes[2].config.policy_path, entry=True
    )
    with pytest.raises(PeerRefusedError, match="cannot feed"):
        await _introduce(cluster, 2, genuine_elsewhere)  # layers 0:k feeding node 2's layers


async def test_a_captured_introduction_cannot_be_replayed(cluster: LocalCluster) -> None:
    upstream = cluster.upstream_of(1)
    captured: list[bytes] = []

    async def recording(challenge: bytes, certificate: bytes) -> bytes:
        captured.append(await upstream.introduce(challenge, certificate))
        return captured[-1]

    await _introduce(cluster, 1, upstream, introduce=recording)  # admitted, and recorded
    node = cluster.nodes[1]
    async with connect(node.ws_url, ssl=node.client_ssl(), compression=None) as ws:
        await ws.recv()  # a fresh challenge
        await ws.send(encode(IntroduceMsg(bundle=captured[0])))
        answer = decode(await ws.recv())
    assert answer.type == "error" and "nonce" in answer.message  # type: ignore[union-attr]


async def test_an_introduction_made_for_another_node_is_refused(cluster: LocalCluster) -> None:
    """A relay cannot pass on what a genuine upstream said to it: the bundle names the
    certificate of the connection it was made for."""
    upstream = cluster.upstream_of(1)

    async def relayed(challenge: bytes, certificate: bytes) -> bytes:
        relay_certificate = b"a certificate of the relay, not of node 1"
        return await upstream.introduce(challenge, relay_certificate)

    with pytest.raises(PeerRefusedError, match="nonce"):
        await _introduce(cluster, 1, upstream, introduce=relayed)


async def test_garbage_in_place_of_a_bundle_is_refused(cluster: LocalCluster) -> None:
    async def garbage(challenge: bytes, certificate: bytes) -> bytes:
        return json.dumps({"evidence": "no"}).encode()

    with pytest.raises(PeerRefusedError, match="not an attestation bundle"):
        await _introduce(cluster, 1, cluster.upstream_of(1), introduce=garbage)
    assert_still_serving(cluster)


# -- whose sessions --------------------------------------------------------------------


async def test_another_connection_cannot_step_or_close_a_session(cluster: LocalCluster) -> None:
    async with PipelineSocket.to(cluster) as owner, PipelineSocket.to(cluster) as other:
        session = (await owner.open(16))["session"]
        stolen = await other.step(session, hidden=hidden(2))  # the hijack of the attack run
        assert (stolen["status"], stolen["code"]) == (404, "unknown_session")
        closed = await other.send_raw(
            encode_close(other, session)
        )  # and closing someone else's session
        assert (closed["status"], closed["code"]) == (404, "unknown_session")
        mine = await owner.step(session, hidden=hidden(2))
        assert mine["type"] == "result" and isinstance(mine["token"], int)


def encode_close(sock: PipelineSocket, session: str) -> bytes:
    from teeshard.transport.messages import CloseMsg

    return encode(CloseMsg(id=next(sock.ids), session=session))


async def test_one_upstream_cannot_fill_the_session_table(cluster: LocalCluster) -> None:
    greedy = cluster.upstream_of(1)
    async with (
        PipelineSocket(cluster.nodes[1].ws_url, cluster.nodes[1].client_ssl(), greedy) as a,
        PipelineSocket(cluster.nodes[1].ws_url, cluster.nodes[1].client_ssl(), greedy) as b,
    ):
        opened = [await a.open(8), await a.open(8), await b.open(8)]  # one peer, two sockets
        assert all(r["type"] == "result" for r in opened)
        refused = await b.open(8)
        assert refused["status"] == 503 and "its limit here" in refused["message"]
    assert_still_serving(cluster)  # the entry, another peer, still gets its sessions


async def test_sessions_that_never_step_do_not_hold_the_cache(cluster: LocalCluster) -> None:
    middle = cluster.nodes[1]
    async with PipelineSocket.to(cluster) as sock:
        idle = (await sock.open(64))["session"]
        busy = (await sock.open(64))["session"]
        assert (await sock.step(busy, hidden=hidden(1)))["type"] == "result"
        for _ in range(60):
            if open_sessions(middle) == 1:
                break
            await asyncio.sleep(0.05)
        assert open_sessions(middle) == 1  # the unstepped one went after 0.5 s
        gone = await sock.step(idle, hidden=hidden(1))
        assert gone["code"] == "unknown_session"
        assert (await sock.step(busy, hidden=hidden(1)))["type"] == "result"


# -- how much at once ------------------------------------------------------------------


async def test_a_flood_of_frames_is_read_only_as_fast_as_it_is_served(
    cluster: LocalCluster,
) -> None:
    middle = cluster.nodes[1]
    assert middle.node is not None
    limit = middle.node.config.pipeline.max_in_flight
    async with PipelineSocket.to(cluster) as sock:
        session = (await sock.open(8))["session"]
        frames = [sock.step_frame(session, hidden=hidden(1)) for _ in range(60)]
        for frame in frames:  # sent without waiting for a single answer
            await sock.ws.send(frame)
        replies = [await sock.receive() for _ in frames]
    assert len(replies) == 60
    assert middle.node.service.counters.frames_in_flight_peak <= limit
    # one step at a time per session: the rest were refused, not queued without bound
    codes = {r.get("code") for r in replies if r["type"] == "error"}
    assert codes <= {"step_in_flight", "context_length_exceeded"}
    assert any(r["type"] == "result" for r in replies)
    assert_still_serving(cluster)


async def test_two_steps_of_one_session_never_run_at_once(cluster: LocalCluster) -> None:
    async with PipelineSocket.to(cluster) as sock:
        session = (await sock.open(32))["session"]
        await sock.ws.send(sock.step_frame(session, hidden=hidden(8)))
        await sock.ws.send(sock.step_frame(session, hidden=hidden(8)))
        first, second = await sock.receive(), await sock.receive()
    outcomes = sorted([first.get("code", "ok"), second.get("code", "ok")])
    assert outcomes == ["ok", "step_in_flight"]
    refused = first if first.get("code") else second
    assert refused["status"] == 409


async def _introduce(
    cluster: LocalCluster, index: int, upstream: NodeTrust, introduce: object = None
) -> None:
    node = cluster.nodes[index]
    async with connect(node.ws_url, ssl=node.client_ssl(), compression=None) as ws:
        await introduce_over(ws, introduce or upstream.introduce, 10, node.ws_url)  # type: ignore[arg-type]


def test_the_stand_in_is_a_faithful_upstream(cluster: LocalCluster) -> None:
    """The attacks above use a real introduction: the same one the entry node sends."""
    stand_in = cluster.upstream_of(1)
    entry = cluster.entry.node
    assert entry is not None
    assert stand_in.attestation.manifest == entry.trust.attestation.manifest
