"""Bad input gets a clear error with a fitting status, and the node keeps serving."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import msgpack
import pytest
import torch
from websockets.exceptions import ConnectionClosed

from teeshard.node import BadRequestError, SessionLimits
from teeshard.transport.codec import tensor_to_wire
from teeshard.transport.messages import WireTensor
from tests.checkpoints import TinyModel
from tests.cluster import LocalCluster, RunningNode
from tests.pipeline_socket import PipelineSocket, hidden

CONTEXT = 256  # the tiny models' max_position_embeddings


def chat(cluster: LocalCluster, **body: Any) -> httpx.Response:
    payload = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 4,
        "temperature": 0,  # greedy: a sampled first token could be EOS and end it empty
        **body,
    }
    return httpx.post(cluster.entry.http_url + "/v1/chat/completions", json=payload, timeout=60)


def assert_still_serving(cluster: LocalCluster) -> None:
    response = chat(cluster)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] >= 1


def assert_error(response: httpx.Response, status: int, fragment: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert fragment in error["message"], error
    assert error["type"]
    return dict(error)


# -- HTTP ---------------------------------------------------------------------------------


def test_malformed_json(cluster: LocalCluster) -> None:
    response = httpx.post(
        cluster.entry.http_url + "/v1/chat/completions",
        content=b"{not json",
        headers={"content-type": "application/json"},
    )
    assert assert_error(response, 400, "not valid JSON")["code"] == "invalid_json"
    assert_still_serving(cluster)


def test_unknown_model(cluster: LocalCluster) -> None:
    assert (
        assert_error(chat(cluster, model="gpt-17"), 404, "does not exist")["code"]
        == "model_not_found"
    )
    assert_still_serving(cluster)


@pytest.mark.parametrize("max_tokens", [0, -5])
def test_non_positive_max_tokens(cluster: LocalCluster, max_tokens: int) -> None:
    assert (
        assert_error(chat(cluster, max_tokens=max_tokens), 400, "max_tokens")["param"]
        == "max_tokens"
    )
    assert_still_serving(cluster)


def test_max_tokens_beyond_context(cluster: LocalCluster) -> None:
    error = assert_error(chat(cluster, max_tokens=CONTEXT), 400, "exceeds this model's context")
    assert error["code"] == "context_length_exceeded"
    assert_still_serving(cluster)


def test_prompt_longer_than_context(cluster: LocalCluster) -> None:
    response = httpx.post(
        cluster.entry.http_url + "/v1/completions",
        json={"model": "tiny", "prompt": "hello world " * 400, "max_tokens": 1},
    )
    assert assert_error(response, 400, "context")["code"] == "context_length_exceeded"
    assert_still_serving(cluster)


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"messages": []}, "messages"),
        ({"messages": "hi"}, "messages"),
        ({"temperature": 5}, "temperature"),
        ({"n": 0}, "n"),
        ({"n": 17}, "n"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ],
)
def test_invalid_fields(cluster: LocalCluster, body: dict[str, Any], fragment: str) -> None:
    assert_error(chat(cluster, **body), 400, fragment)
    assert_still_serving(cluster)


def test_bad_authorization_header(cluster: LocalCluster) -> None:
    response = httpx.post(
        cluster.entry.http_url + "/v1/completions",
        headers={"Authorization": "Token x"},
        json={"model": "tiny", "prompt": "hi"},
    )
    assert_error(response, 401, "Bearer")


def test_unknown_route_is_an_openai_error(cluster: LocalCluster) -> None:
    assert_error(httpx.get(cluster.entry.http_url + "/v1/nothing"), 404, "Not Found")


# -- cache budget -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_cluster(tiny_llama: TinyModel) -> Iterator[LocalCluster]:
    limits = SessionLimits(max_sessions=2, max_cached_tokens=100, idle_timeout_s=300)
    with LocalCluster(tiny_llama.path, 2, limits=limits) as running:
        yield running


def test_a_session_larger_than_the_cache_budget_is_400_at_once(
    small_cluster: LocalCluster,
) -> None:
    """It fits the model's context, not the node's 100-token budget: no wait could help,
    so it is refused at once rather than queued."""
    response = chat(small_cluster, max_tokens=120)
    error = assert_error(response, 400, "reserves at most 100")
    assert error["code"] == "context_length_exceeded"
    assert_still_serving(small_cluster)


async def test_session_limit_is_503_and_nothing_leaks(small_cluster: LocalCluster) -> None:
    client = PipelineSocket.to(small_cluster)
    async with client:
        first = await client.open(10)
        second = await client.open(10)
        assert first["type"] == second["type"] == "result"
        refused = await client.open(10)
        assert (
            refused["type"] == "error"
            and refused["status"] == 503
            and "open sessions" in refused["message"]
        )
    # the socket closed without closing its sessions: the node closes them itself,
    # here and downstream, so nothing stays reserved
    for node in small_cluster.nodes:
        assert await _eventually_no_sessions(node)
    assert_still_serving(small_cluster)


async def _eventually_no_sessions(node: RunningNode) -> bool:
    import asyncio

    for _ in range(100):
        if node.get("/health").json()["sessions"]["open"] == 0:
            return True
        await asyncio.sleep(0.05)
    return False


# -- pipeline socket ----------------------------------------------------------------------


@pytest.fixture
async def downstream(cluster: LocalCluster) -> Any:
    """The raw socket of the second node (layers 2:4), which takes hidden states."""
    async with PipelineSocket.to(cluster) as sock:
        yield sock


async def test_unknown_session(downstream: PipelineSocket) -> None:
    reply = await downstream.step("no-such-session", hidden=hidden(1))
    assert (reply["type"], reply["status"], reply["code"]) == ("error", 404, "unknown_session")


@pytest.mark.parametrize(
    ("wire", "fragment"),
    [
        (hidden(3, width=65), "shape (1, T, 64)"),
        (WireTensor(dtype="float32", shape=(64,), data=bytes(256)), "shape (1, T, 64)"),
        (hidden(2, dtype="float16"), "does not match the session's float32"),
        (WireTensor(dtype="int64", shape=(1, 1, 64), data=bytes(512)), "dtype 'int64'"),
        (WireTensor(dtype="float32", shape=(1, 2, 64), data=bytes(100)), "needs 512 bytes"),
        (tensor_to_wire(torch.full((1, 1, 64), float("nan")), "float32"), "NaN"),
    ],
)
async def test_wrong_tensors_are_refused_and_the_session_survives(
    downstream: PipelineSocket, wire: WireTensor, fragment: str
) -> None:
    opened = await downstream.open(16)
    reply = await downstream.step(opened["session"], hidden=wire)
    assert reply["type"] == "error" and reply["status"] == 400 and fragment in reply["message"], (
        reply
    )
    ok = await downstream.step(opened["session"], hidden=hidden(2))
    assert ok["type"] == "result" and isinstance(ok["token"], int)


async def test_tokens_sent_to_a_middle_node(downstream: PipelineSocket) -> None:
    opened = await downstream.open(8)
    reply = await downstream.step(opened["session"], tokens=(1, 2))
    assert reply["status"] == 400 and "takes hidden states" in reply["message"]


async def test_step_past_max_len(downstream: PipelineSocket) -> None:
    opened = await downstream.open(4)
    reply = await downstream.step(opened["session"], hidden=hidden(5))
    assert reply["code"] == "context_length_exceeded" and reply["status"] == 400


async def test_out_of_vocabulary_tokens(cluster: LocalCluster) -> None:
    stage = cluster.entry_stage()
    session = await stage.open_session(8)
    with pytest.raises(BadRequestError, match="token ids must lie in") as refused:
        await stage.step(session, [5, 100_000])
    assert refused.value.status == 400
    await stage.close_session(session)


@pytest.mark.parametrize(
    ("frame", "fragment"),
    [
        (b"\xc1garbage", "not valid msgpack"),
        (msgpack.packb([1, 2, 3]), "must be a msgpack map"),
        (msgpack.packb({"v": 2, "type": "step", "id": 1}), "protocol version"),
        (msgpack.packb({"v": 1, "type": "launch", "id": 1}), "invalid launch message"),
        (msgpack.packb({"v": 1, "type": "close", "id": 1, "session": "x", "extra": 1}), "extra"),
        ("a text frame", "must be binary"),
    ],
)
async def test_malformed_frames(
    downstream: PipelineSocket, frame: bytes | str, fragment: str
) -> None:
    reply = await downstream.send_raw(frame)
    assert reply["type"] == "error" and reply["status"] == 400 and fragment in reply["message"], (
        reply
    )
    opened = await downstream.open(4)  # same connection, still served
    assert opened["type"] == "result"


async def test_oversized_frame_closes_only_that_connection(cluster: LocalCluster) -> None:
    limit = cluster.nodes[1].node.max_frame_bytes  # type: ignore[union-attr]
    async with PipelineSocket.to(cluster) as sock:
        # the server may close while the frame is still being sent: both are the refusal
        with pytest.raises(ConnectionClosed) as closed:
            await sock.ws.send(b"\x00" * (limit + 1))
            await sock.ws.recv()
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009  # message too big
    async with PipelineSocket.to(cluster) as sock:
        assert (await sock.open(4))["type"] == "result"
    assert_still_serving(cluster)
