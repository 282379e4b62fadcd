"""A burst beyond what the caches admit waits in the entry's queue and is answered.

Real servers on loopback: two nodes that each admit only 4 sessions, and 64
requests at once. Every one gets a 200 with the answer it gets alone; steps of
concurrent sessions shared batched forwards; a client that leaves while queued
leaves the queue; past the queue's bounds the answer is 429 with Retry-After.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Iterator

import httpx
import pytest

from teeshard.entry.admission import QueueLimits
from teeshard.node import SessionLimits
from teeshard.node.metrics import series_total
from tests.checkpoints import TinyModel
from tests.cluster import LocalCluster
from tests.pipeline_socket import PipelineSocket

BURST = 64


@pytest.fixture(scope="module")
def small_cluster(tiny_llama: TinyModel) -> Iterator[LocalCluster]:
    with LocalCluster(
        tiny_llama.path,
        2,
        limits=SessionLimits(max_sessions=4),
        entry_options={"queue": QueueLimits(max_waiting=BURST, max_wait_s=120)},
    ) as running:
        yield running


def body(i: int, max_tokens: int = 8) -> dict[str, object]:
    return {
        "model": "tiny",
        "prompt": f"request number {i % 7}",
        "max_tokens": max_tokens,
        "temperature": 0,
    }


metric = series_total


async def test_a_burst_of_64_is_queued_batched_and_all_answered(
    small_cluster: LocalCluster,
) -> None:
    async with httpx.AsyncClient(base_url=small_cluster.entry.http_url, timeout=300) as client:
        solo = {}
        for i in range(7):
            response = await client.post("/v1/completions", json=body(i))
            solo[i] = response.json()["choices"][0]["text"]
        responses = await asyncio.gather(
            *(client.post("/v1/completions", json=body(i)) for i in range(BURST))
        )
    statuses = [r.status_code for r in responses]
    assert statuses == [200] * BURST, [r.text for r in responses if r.status_code != 200][:3]
    for i, response in enumerate(responses):
        assert response.json()["choices"][0]["text"] == solo[i % 7]
    entry_metrics = small_cluster.entry.get("/metrics").text
    assert metric(entry_metrics, "teeshard_queue_admitted_total") >= BURST - 4 * 2
    assert metric(entry_metrics, "teeshard_queue_depth") == 0
    steps = metric(entry_metrics, "teeshard_steps_total")
    batches = metric(entry_metrics, "teeshard_batches_total")
    assert 0 < batches < steps, "the entry never ran two sessions' steps in one forward"
    # the seven requests one at a time decoded alone: on the event loop's thread
    assert metric(entry_metrics, "teeshard_inline_batches_total") > 0


@pytest.fixture(scope="module")
def held_cluster(tiny_llama: TinyModel) -> Iterator[LocalCluster]:
    """Nodes of one session each; tests fill node 1 through its pipeline socket (as an
    attested upstream would), so the entry's requests must wait for as long as they hold it."""
    with LocalCluster(
        tiny_llama.path,
        2,
        limits=SessionLimits(max_sessions=1),
        entry_options={"queue": QueueLimits(max_waiting=1, max_wait_s=1.0, poll_s=0.02)},
    ) as running:
        yield running


async def eventually(condition: Callable[[], bool], timeout_s: float = 20.0) -> None:
    for _ in range(int(timeout_s / 0.02)):
        if condition():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition never became true")


def entry_metric(cluster: LocalCluster, name: str, **labels: str) -> float:
    return metric(cluster.entry.get("/metrics").text, name, **labels)


async def test_past_the_queue_and_past_the_deadline_the_answer_is_429(
    held_cluster: LocalCluster,
) -> None:
    url = held_cluster.entry.http_url
    async with (
        PipelineSocket.to(held_cluster) as holder,
        httpx.AsyncClient(base_url=url, timeout=60) as client,
    ):
        assert (await holder.open(10))["type"] == "result"  # node 1 is now full
        waiting = asyncio.create_task(client.post("/v1/completions", json=body(1)))
        await eventually(lambda: entry_metric(held_cluster, "teeshard_queue_depth") == 1)
        full = await client.post("/v1/completions", json=body(2))
        late = await waiting  # waited its 1 s for room that never came
    for response, code in ((full, "queue_full"), (late, "queue_timeout")):
        assert response.status_code == 429, response.text
        assert re.fullmatch(r"[1-9][0-9]*", response.headers["retry-after"])
        error = response.json()["error"]
        assert error["code"] == code and error["type"] == "rate_limit_error"
    # the holder has gone: room again, and the server serves
    await eventually(lambda: held_cluster.nodes[1].get("/health").json()["sessions"]["open"] == 0)
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        assert (await client.post("/v1/completions", json=body(3))).status_code == 200
    assert entry_metric(held_cluster, "teeshard_queue_refused_total", reason="full") >= 1
    assert entry_metric(held_cluster, "teeshard_queue_refused_total", reason="deadline") >= 1


async def test_a_queued_request_opens_when_room_frees_and_a_leaver_leaves_at_once(
    held_cluster: LocalCluster,
) -> None:
    url = held_cluster.entry.http_url
    left_before = entry_metric(held_cluster, "teeshard_queue_left_total")
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        async with PipelineSocket.to(held_cluster) as holder:
            assert (await holder.open(10))["type"] == "result"
            leaver = asyncio.create_task(client.post("/v1/completions", json=body(4)))
            await eventually(lambda: entry_metric(held_cluster, "teeshard_queue_depth") == 1)
            leaver.cancel()  # the client goes away while it waits
            await asyncio.gather(leaver, return_exceptions=True)
            await eventually(
                lambda: entry_metric(held_cluster, "teeshard_queue_left_total") == left_before + 1
            )
            assert entry_metric(held_cluster, "teeshard_queue_depth") == 0
            patient = asyncio.create_task(client.post("/v1/completions", json=body(5)))
            await eventually(lambda: entry_metric(held_cluster, "teeshard_queue_depth") == 1)
        # the holder's socket closed: node 1 frees its session, and the waiter opens
        response = await patient
    assert response.status_code == 200, response.text
