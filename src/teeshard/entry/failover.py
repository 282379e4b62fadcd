"""Failover decisions for the generation loop: which faults to route around, and when
to stop.

Only transport faults are retried (``DownstreamError.transport_fault``: a node died,
timed out or dropped the link, and the hop that lost it named it); attestation
failures and bad input leave as they are. Each fault bans the named node in the
registry and counts an attempt; after ``FailoverPolicy.max_attempts`` new routes,
or once ``deadline_s`` has passed since the request's first fault, the request
fails with a 502. Mid-stream (after a fault) a request with no route waits for
one until that deadline, so a restarted node can take the session over; before
any output, no route is a plain 503.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from teeshard.attest import Receipt
from teeshard.entry.errors import APIError
from teeshard.entry.registry import Registry
from teeshard.entry.routing import NoRouteError, Route
from teeshard.node import DownstreamError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FailoverPolicy:
    max_attempts: int = 4  # new routes per request after transport faults
    deadline_s: float = 60.0  # no new attempt this long after the request's first fault


@dataclass
class FaultLog:
    """One request's transport faults so far."""

    attempts: int = 0  # new routes tried after transport faults
    first_fault: float | None = None  # monotonic time of the first fault


@dataclass(frozen=True)
class ReceiptSegment:
    """The part of an answer one route produced: tokens ``[token_start, token_end)`` of
    the completion, and the receipts its stages signed (the nodes alive at its end)."""

    token_start: int
    token_end: int
    receipts: tuple[Receipt, ...]

    def to_json(self) -> dict[str, object]:
        return {
            "tokens": [self.token_start, self.token_end],
            "receipts": [r.to_json() for r in self.receipts],
        }


class Rerouter:
    def __init__(self, registry: Registry | None, policy: FailoverPolicy) -> None:
        self.registry = registry  # None: a static chain, nothing to route around
        self.policy = policy

    async def choose(self, faults: FaultLog) -> Route:
        """A route now (``()`` without a registry: the node's --next); after a fault,
        wait for one until the deadline."""
        if self.registry is None:
            return ()
        delay = 0.1
        while True:
            try:
                return self.registry.choose()
            except NoRouteError as exc:
                if faults.first_fault is None:  # before any output: a plain 503
                    raise APIError(503, exc.message, code="no_route") from None
                left = faults.first_fault + self.policy.deadline_s - time.monotonic()
                if left <= 0:
                    raise APIError(
                        503, f"no route before the failover deadline: {exc.message}",
                        code="no_route",
                    ) from None  # fmt: skip
                await asyncio.sleep(min(delay, left))
                delay = min(delay * 2, 1.0)

    def fault(self, faults: FaultLog, exc: DownstreamError, request_id: str) -> None:
        """Ban the failed node and count an attempt; re-raise ``exc`` when it is not a
        transport fault, an ``APIError`` when no attempt is left."""
        if self.registry is None or not exc.transport_fault:
            raise exc
        assert exc.node is not None
        self.registry.ban(exc.node, exc.message)
        now = time.monotonic()
        if faults.first_fault is None:
            faults.first_fault = now
        late = now - faults.first_fault > self.policy.deadline_s
        if faults.attempts >= self.policy.max_attempts or late:
            why = "the failover deadline passed" if late else f"{faults.attempts} new routes"
            raise APIError(
                502,
                f"the network could not serve this request ({why}); last fault: {exc.message}",
                code="downstream_failed",
            ) from None
        faults.attempts += 1
        self.registry.counters.retries += 1
        log.warning(
            "request %s: %s failed (%s); trying another route (attempt %d)",
            request_id, exc.node, exc.code, faults.attempts,
        )  # fmt: skip
