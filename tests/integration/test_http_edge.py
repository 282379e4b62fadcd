"""The entry node's HTTP edge under the attacks of the review: huge bodies, slow headers,
too many connections, out-of-range sampling values, public load detail, plain HTTP on a
public address. Each is refused clearly, and the node keeps serving."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import httpx
import pytest

from teeshard.model import LayerRange
from teeshard.server.config import NodeConfig
from tests.checkpoints import TinyModel
from tests.cluster import LocalCluster
from tests.integration.test_bad_input import assert_still_serving, chat

ADMIN = "admin-token-for-tests"


@pytest.fixture(scope="module")
def edge(tiny_llama: TinyModel) -> Iterator[LocalCluster]:
    options = {
        "max_body_bytes": 64 << 10,
        "header_timeout_s": 0.5,
        "max_connections": 6,
        "admin_token": ADMIN,
    }
    with LocalCluster(tiny_llama.path, 2, entry_options=options) as running:
        yield running


def url(cluster: LocalCluster, path: str = "/v1/chat/completions") -> str:
    return cluster.entry.http_url + path


# -- bodies ----------------------------------------------------------------------------


def test_a_body_over_the_limit_is_refused_by_its_length(edge: LocalCluster) -> None:
    big = (
        b'{"model": "tiny", "messages": [{"role": "user", "content": "' + b"x" * (1 << 20) + b'"}]}'
    )
    response = httpx.post(url(edge), content=big, headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"
    assert_still_serving(edge)


def test_a_chunked_body_is_cut_off_once_it_passes_the_limit(edge: LocalCluster) -> None:
    sent = 0

    def chunks() -> Iterator[bytes]:
        nonlocal sent
        yield b'{"model": "tiny", "messages": [{"role": "user", "content": "'
        for _ in range(1000):  # 1000 x 64 KiB = 64 MiB, if the server read it all
            sent += 1
            yield b"y" * (64 << 10)
        yield b'"}]}'

    try:
        response = httpx.post(url(edge), content=chunks(), timeout=30)
        assert response.status_code == 413
    except httpx.HTTPError:
        pass  # the server may also drop the connection while we are still sending
    assert sent < 1000  # it stopped reading long before the end
    assert_still_serving(edge)


def test_a_sealed_body_over_the_limit_is_refused_before_it_is_read(edge: LocalCluster) -> None:
    response = httpx.post(
        url(edge, "/v1/sealed"),
        content=b"\0" * (1 << 20),
        headers={"content-type": "application/teeshard-sealed"},
    )
    assert response.status_code == 413


# -- slow and many clients -------------------------------------------------------------


def test_a_client_trickling_its_headers_is_disconnected(edge: LocalCluster) -> None:
    port = edge.entry.config.port
    with socket.create_connection(("127.0.0.1", port), timeout=5) as slow:
        slow.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
        started = time.monotonic()
        closed = False
        while time.monotonic() - started < 5:
            try:
                slow.sendall(b"X-Slow: 1\r\n")
                if slow.recv(1, socket.MSG_DONTWAIT) == b"":
                    closed = True
                    break
            except BlockingIOError:
                pass
            except OSError:
                closed = True
                break
            time.sleep(0.1)
    assert closed and time.monotonic() - started < 3  # cut off after the 0.5 s deadline
    assert_still_serving(edge)


async def test_connections_beyond_the_cap_get_503_and_the_node_recovers(
    edge: LocalCluster,
) -> None:
    port = edge.entry.config.port
    idle = []
    for _ in range(6):  # hold the cap's worth of connections open
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")  # kept alive afterwards
        await writer.drain()
        await reader.readuntil(b"\r\n\r\n")
        idle.append(writer)
    async with httpx.AsyncClient() as client:
        refused = await client.get(url(edge, "/v1/models"))
    assert refused.status_code == 503
    for writer in idle:
        writer.close()
    await asyncio.sleep(0.3)
    assert_still_serving(edge)


# -- sampling values -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [("seed", 2**70), ("seed", -1), ("top_k", 10**12), ("temperature", 1e-30)],
)
def test_out_of_range_sampling_values_are_400(
    edge: LocalCluster, field: str, value: object
) -> None:
    response = chat(edge, **{field: value})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == field
    assert_still_serving(edge)


def test_the_largest_allowed_seed_and_a_small_temperature_work(edge: LocalCluster) -> None:
    response = chat(edge, seed=2**63 - 1, temperature=0.001, top_k=10**6)
    assert response.status_code == 200, response.text


# -- who sees load ---------------------------------------------------------------------


async def test_health_and_metrics_say_nothing_about_load_to_strangers(
    edge: LocalCluster,
) -> None:
    entry = edge.entry.node
    assert entry is not None
    stranger = httpx.ASGITransport(app=entry.app, client=("203.0.113.9", 4000))
    async with httpx.AsyncClient(transport=stranger, base_url="http://entry") as client:
        health = (await client.get("/health")).json()
        metrics = await client.get("/metrics")
        admin = {"Authorization": f"Bearer {ADMIN}"}
        detailed = (await client.get("/health", headers=admin)).json()
        admin_metrics = await client.get("/metrics", headers=admin)
        wrong = await client.get("/metrics", headers={"Authorization": "Bearer guess"})
    assert set(health) == {"status", "insecure"}
    assert metrics.status_code == 403 and metrics.json()["error"]["code"] == "admin_only"
    assert "sessions" in detailed and admin_metrics.status_code == 200
    assert "teeshard_tokens_processed_total" in admin_metrics.text
    assert wrong.status_code == 403
    assert "sessions" in edge.entry.get("/health").json()  # loopback, loopback-only node


# -- plain HTTP on a public address ------------------------------------------------------


def test_an_entry_node_refuses_plain_http_on_a_public_address(tiny_llama: TinyModel) -> None:
    base = NodeConfig(model_dir=Path(tiny_llama.path), layers=LayerRange(0, 4), entry=True)
    public = replace(base, host="0.0.0.0")
    with pytest.raises(ValueError, match=r"plain HTTP on 0\.0\.0\.0"):
        public.validate(4)
    replace(public, behind_ingress=True).validate(4)  # said so: allowed
    replace(public, tls=True).validate(4)  # or with TLS
    base.validate(4)  # loopback is fine
