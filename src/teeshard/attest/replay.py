"""Sealed requests are accepted once, and only near the time they were sealed.

A captured sealed request is opaque to whoever captured it, but it could be sent
again, and every copy would be charged to its sender. Two checks stop that:

* :func:`check_time`: the timestamp sealed inside must be within ``window_s`` of
  the node's clock (a TEE's clock comes from the host: the window bounds the
  damage, the cache below does the rest);
* :class:`ReplayCache`: the request ids seen, each kept until its timestamp is
  ``window_s`` old, after which :func:`check_time` refuses it anyway. The cache is
  bounded: when full of live entries it refuses new requests (fail closed, 503)
  rather than forget one that could then be replayed.
"""

from __future__ import annotations

import heapq

from teeshard.attest.errors import ReplayCacheFull, ReplayedRequest, StaleRequest

DEFAULT_MAX_ENTRIES = 100_000


def check_time(timestamp: int, now: float, window_s: float) -> None:
    skew = now - timestamp
    if abs(skew) > window_s:
        direction = "old" if skew > 0 else "in the future"
        raise StaleRequest(
            f"sealed request is {abs(skew):.0f} s {direction}: outside the ±{window_s:.0f} s window"
        )


class ReplayCache:
    """Request ids seen within the time window; pure (the caller gives the time)."""

    def __init__(self, window_s: float, max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        self.window_s = window_s
        self.max_entries = max_entries
        self._expiry: dict[bytes, float] = {}
        self._heap: list[tuple[float, bytes]] = []

    def __len__(self) -> int:
        return len(self._expiry)

    def _purge(self, now: float) -> None:
        while self._heap and self._heap[0][0] < now:
            _, request_id = heapq.heappop(self._heap)
            self._expiry.pop(request_id, None)

    def admit(self, request_id: bytes, timestamp: int, now: float) -> None:
        """Check the time and record the id; StaleRequest, ReplayedRequest or ReplayCacheFull."""
        check_time(timestamp, now, self.window_s)
        self._purge(now)
        if request_id in self._expiry:
            raise ReplayedRequest("sealed request was already received: a replay is refused")
        if len(self._expiry) >= self.max_entries:
            raise ReplayCacheFull("too many sealed requests in the time window; retry shortly")
        expiry = timestamp + self.window_s
        self._expiry[request_id] = expiry
        heapq.heappush(self._heap, (expiry, request_id))
