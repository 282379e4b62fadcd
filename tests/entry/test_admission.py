"""The admission queue: first come first served, bounded, with a deadline and leavers.

The "caches" here are a counter of free slots that ``open`` takes and raises the
node's own ``OverloadedError`` without; the real servers are in
tests/integration/test_queue.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from teeshard.entry.admission import AdmissionQueue, ClientGoneError, QueueLimits
from teeshard.entry.errors import APIError
from teeshard.node import BadRequestError, OverloadedError


class Slots:
    def __init__(self, free: int) -> None:
        self.free = free
        self.order: list[str] = []

    def opener(self, name: str) -> Callable[[], Awaitable[str]]:
        async def open_session() -> str:
            if self.free == 0:
                raise OverloadedError("no room")
            self.free -= 1
            self.order.append(name)
            return name

        return open_session

    def release(self, queue: AdmissionQueue) -> None:
        self.free += 1
        queue.finished(0.01)


async def test_waiters_open_in_arrival_order_as_room_frees() -> None:
    queue = AdmissionQueue(QueueLimits(poll_s=5))  # only notifications wake them
    slots = Slots(1)
    assert await queue.admit(slots.opener("first")) == "first"
    waiters = []
    for name in ("a", "b", "c"):
        waiters.append(asyncio.create_task(queue.admit(slots.opener(name))))
        await asyncio.sleep(0.01)
    assert queue.depth == 3
    for expected in ("a", "b", "c"):
        slots.release(queue)
        await asyncio.sleep(0.01)
        assert slots.order[-1] == expected
    assert [await w for w in waiters] == ["a", "b", "c"]
    assert queue.depth == 0 and queue.counters.admitted_after_wait == 3


async def test_a_newcomer_does_not_overtake_the_queue_when_room_frees() -> None:
    queue = AdmissionQueue(QueueLimits(poll_s=5))
    slots = Slots(0)
    waiting = asyncio.create_task(queue.admit(slots.opener("waiting")))
    await asyncio.sleep(0.01)
    slots.free = 1  # room frees without a notification; a newcomer arrives
    newcomer = asyncio.create_task(queue.admit(slots.opener("newcomer")))
    await asyncio.sleep(0.01)
    assert slots.order == []  # the newcomer queued behind instead of taking the room
    slots.release(queue)  # now two free: both in order
    assert await waiting == "waiting" and await newcomer == "newcomer"
    assert slots.order == ["waiting", "newcomer"]


async def test_a_full_queue_answers_429_with_retry_after() -> None:
    queue = AdmissionQueue(QueueLimits(max_waiting=2, poll_s=5))
    slots = Slots(0)
    waiters = [asyncio.create_task(queue.admit(slots.opener(n))) for n in ("a", "b")]
    await asyncio.sleep(0.01)
    with pytest.raises(APIError) as refused:
        await queue.admit(slots.opener("c"))
    assert refused.value.status == 429 and refused.value.code == "queue_full"
    assert int(refused.value.headers["Retry-After"]) >= 1
    assert queue.counters.refused["full"] == 1
    slots.free = 2
    queue.finished(0.01)
    assert [await w for w in waiters] == ["a", "b"]


async def test_a_request_waits_at_most_the_deadline() -> None:
    queue = AdmissionQueue(QueueLimits(max_wait_s=0.1, poll_s=0.02))
    slots = Slots(0)
    started = asyncio.get_running_loop().time()
    with pytest.raises(APIError) as refused:
        await queue.admit(slots.opener("late"))
    waited = asyncio.get_running_loop().time() - started
    assert refused.value.status == 429 and refused.value.code == "queue_timeout"
    assert 0.09 < waited < 2.0
    assert queue.depth == 0 and queue.counters.refused["deadline"] == 1


async def test_a_client_that_goes_away_leaves_the_queue_and_the_next_moves_up() -> None:
    queue = AdmissionQueue(QueueLimits(poll_s=0.01))
    slots = Slots(0)
    left = {"gone": False}

    async def gone() -> bool:
        return left["gone"]

    leaving = asyncio.create_task(queue.admit(slots.opener("leaving"), gone))
    await asyncio.sleep(0.02)
    staying = asyncio.create_task(queue.admit(slots.opener("staying")))
    await asyncio.sleep(0.02)
    left["gone"] = True
    with pytest.raises(ClientGoneError):
        await leaving
    assert queue.depth == 1 and queue.counters.left == 1
    slots.release(queue)
    assert await staying == "staying"


async def test_errors_that_are_not_about_room_pass_through_at_once() -> None:
    queue = AdmissionQueue()

    async def bad() -> None:
        raise BadRequestError("the route makes no sense", code="bad_route")

    with pytest.raises(BadRequestError):
        await queue.admit(bad)
    assert queue.depth == 0 and queue.counters.waited == 0


async def test_a_cancelled_waiter_leaves_the_queue() -> None:
    queue = AdmissionQueue(QueueLimits(poll_s=5))
    slots = Slots(0)
    waiter = asyncio.create_task(queue.admit(slots.opener("w")))
    await asyncio.sleep(0.01)
    waiter.cancel()
    await asyncio.gather(waiter, return_exceptions=True)
    assert queue.depth == 0
