"""The entry's admission queue: a burst waits its turn instead of being refused.

Opening a session reserves KV cache on every node of its route; when some node
has no room (``overloaded``, 503), the request does not fail at once: it joins a
bounded first-come-first-served queue and opens as soon as room frees. Only the
head of the queue tries to open, when a session of this entry closes (notified)
or every ``poll_s`` (room on a downstream node shared with other entries frees
without notice), so later arrivals can never overtake it. A request that finds
the queue full, or has waited ``max_wait_s``, is answered 429 with a
``Retry-After`` estimated from how fast sessions have been finishing; one whose
client went away leaves the queue at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar, cast

from teeshard.entry.errors import APIError
from teeshard.node import Metrics, NodeError

__all__ = [
    "AdmissionQueue",
    "ClientGoneError",
    "QueueCounters",
    "QueueLimits",
    "queue_metrics",
]

T = TypeVar("T")
Gone = Callable[[], Awaitable[bool]]  # True once the client has disconnected


@dataclass(frozen=True)
class QueueLimits:
    max_waiting: int = 256  # requests waiting for room; past that, 429 at once
    max_wait_s: float = 60.0  # the longest a request waits for room before a 429
    poll_s: float = 0.05  # how often the head retries without a notification

    def __post_init__(self) -> None:
        if self.max_waiting < 0 or self.max_wait_s < 0 or self.poll_s <= 0:
            raise ValueError("queue limits must be non-negative (poll_s positive)")


@dataclass
class QueueCounters:
    """For ``/metrics``: what the queue held and how long requests waited in it."""

    admitted_after_wait: int = 0
    wait_seconds: float = 0.0  # summed over requests that waited (admitted or not)
    waited: int = 0
    refused: dict[str, int] = field(default_factory=lambda: {"full": 0, "deadline": 0})
    left: int = 0  # clients that went away while waiting


class ClientGoneError(APIError):
    """The client disconnected while its request waited; nobody reads this answer."""

    def __init__(self) -> None:
        super().__init__(499, "the client closed the request while it waited", code="client_gone")


def _overloaded(exc: BaseException) -> bool:
    return isinstance(exc, NodeError) and exc.code == "overloaded"


class AdmissionQueue:
    def __init__(self, limits: QueueLimits | None = None) -> None:
        self.limits = limits or QueueLimits()
        self.counters = QueueCounters()
        self._waiting: deque[object] = deque()  # tickets, first come first
        self._changed = asyncio.Event()
        self._served_s = 1.0  # moving average of how long an admitted session lasts
        self._active = 0  # sessions admitted through this queue and not yet finished

    @property
    def depth(self) -> int:
        return len(self._waiting)

    async def admit(self, open_session: Callable[[], Awaitable[T]], gone: Gone | None = None) -> T:
        """Run ``open_session`` now if it finds room, else wait in line for room.

        Errors other than ``overloaded`` pass through unchanged (they are not about
        room). Call :meth:`finished` when the admitted session closes.
        """
        if not self._waiting:  # nobody ahead: no reason to wait
            opened, result = await self._attempt(open_session)
            if opened:
                return cast(T, result)
        if len(self._waiting) >= self.limits.max_waiting:
            self.counters.refused["full"] += 1
            raise self._too_many(
                f"the server is at capacity and {len(self._waiting)} requests are waiting already",
                "queue_full",
            )
        ticket = object()
        self._waiting.append(ticket)
        started = time.monotonic()
        deadline = started + self.limits.max_wait_s
        try:
            while True:
                if self._waiting[0] is ticket:
                    opened, result = await self._attempt(open_session)
                    if opened:
                        self.counters.admitted_after_wait += 1
                        return cast(T, result)
                await self._wait_for_change(deadline, gone)
        finally:
            self._waiting.remove(ticket)
            self.counters.waited += 1
            self.counters.wait_seconds += time.monotonic() - started
            self._notify()  # the next in line may try now

    async def _attempt(self, open_session: Callable[[], Awaitable[T]]) -> tuple[bool, T | None]:
        """(True, its result) if the session opened; (False, None) if there was no room."""
        try:
            result = await open_session()
        except NodeError as exc:
            if not _overloaded(exc):
                raise
            return False, None
        self._active += 1
        return True, result

    def finished(self, served_s: float) -> None:
        """An admitted session closed after ``served_s`` seconds: room may have freed."""
        self._active = max(0, self._active - 1)
        self._served_s = 0.8 * self._served_s + 0.2 * max(served_s, 0.0)
        self._notify()

    async def _wait_for_change(self, deadline: float, gone: Gone | None) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            self.counters.refused["deadline"] += 1
            raise self._too_many(
                f"no room freed within {self.limits.max_wait_s:g} s of waiting; retry later",
                "queue_timeout",
            )
        changed = self._changed
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(changed.wait(), timeout=min(self.limits.poll_s, remaining))
        if gone is not None and await gone():
            self.counters.left += 1
            raise ClientGoneError()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _too_many(self, message: str, code: str) -> APIError:
        # ahead of a new request: everyone waiting, served ``_active`` at a time
        waits = (len(self._waiting) + 1) * self._served_s / max(1, self._active)
        retry_after = max(1, min(3600, math.ceil(waits)))
        return APIError(429, message, code=code, headers={"Retry-After": str(retry_after)})


def queue_metrics(metrics: Metrics, queue: AdmissionQueue) -> None:
    """Add the admission queue's depth and waits to the entry's ``/metrics``."""
    metrics.gauge("teeshard_queue_depth", "Requests waiting for cache room", lambda: queue.depth)
    metrics.counter("teeshard_queue_wait_seconds_total", "Time requests spent waiting for room")
    metrics.counter("teeshard_queue_waited_total", "Requests that waited for room")
    metrics.counter("teeshard_queue_admitted_total", "Requests admitted after waiting")
    metrics.counter("teeshard_queue_refused_total", "Requests answered 429, by reason")
    metrics.counter("teeshard_queue_left_total", "Clients that went away while waiting")

    def read() -> None:
        counters = queue.counters
        metrics.set("teeshard_queue_wait_seconds_total", counters.wait_seconds)
        metrics.set("teeshard_queue_waited_total", counters.waited)
        metrics.set("teeshard_queue_admitted_total", counters.admitted_after_wait)
        metrics.set("teeshard_queue_left_total", counters.left)
        for reason, count in counters.refused.items():
            metrics.set("teeshard_queue_refused_total", count, reason=reason)

    metrics.before_render(read)
