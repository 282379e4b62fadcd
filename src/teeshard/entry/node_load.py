"""A node's measured step load, read from its ``/metrics`` when the registry probes it.

Route choice weighs more than the sessions this entry holds on a node: the node's
own step counters say how long its steps take now and how busy it is for every
entry. At each probe the registry reads (after the node's attestation verified)

- ``teeshard_steps_total`` and ``teeshard_step_seconds_total``: the recent step
  time is the compute seconds per step between two probes (``step_ms``); with no
  step in between, the last measure stands;
- ``teeshard_sessions_open``: sessions the node holds, for every entry;
- ``teeshard_pipeline_frames_in_flight``: steps it is running at that moment.

``/metrics`` is for the node's admin token or a node bound to loopback (request
sizes must not leak): the entry sends its own ``--admin-token`` (operators who
share a network give their entry the token; on loopback none is needed), over
TLS pinned to the certificate the probe just verified, so the token goes to the
attested node only. A node that refuses (403) or answers nonsense is routed by
this entry's sessions alone, as before. ``parse_metrics`` and ``recent_step_ms``
are pure; ``metrics_reader`` is the I/O.
"""

from __future__ import annotations

import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import httpx

from teeshard.attest import pinned_client_context

STEPS = "teeshard_steps_total"
STEP_SECONDS = "teeshard_step_seconds_total"
SESSIONS = "teeshard_sessions_open"
IN_FLIGHT = "teeshard_pipeline_frames_in_flight"
MAX_METRICS_BYTES = 1 << 20
_SERIES = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{.*\})?\s+(?P<value>\S+)")

# (node URL wss://host:port, the PEM of the certificate its probe verified) -> /metrics text
LoadReader = Callable[[str, bytes], Awaitable[str]]


@dataclass(frozen=True)
class MetricsSample:
    """What one read of a node's ``/metrics`` said, and when (monotonic seconds)."""

    at: float
    steps: float
    step_seconds: float
    sessions: int
    in_flight: int


def parse_metrics(text: str, at: float | None = None) -> MetricsSample:
    """The four series above, summed over their labels; ``ValueError`` if one is missing."""
    wanted = {STEPS: 0.0, STEP_SECONDS: 0.0, SESSIONS: 0.0, IN_FLIGHT: 0.0}
    seen: set[str] = set()
    for line in text.splitlines():
        found = _SERIES.match(line)
        if found is None or found["name"] not in wanted:
            continue
        name, number = found["name"], float(found["value"])  # ValueError on nonsense
        if not 0 <= number < float("inf"):
            raise ValueError(f"{name} is {number}")
        wanted[name] += number
        seen.add(name)
    missing = set(wanted) - seen
    if missing:
        raise ValueError(f"the metrics lack {', '.join(sorted(missing))}")
    return MetricsSample(
        time.monotonic() if at is None else at,
        wanted[STEPS],
        wanted[STEP_SECONDS],
        int(wanted[SESSIONS]),
        int(wanted[IN_FLIGHT]),
    )


def recent_step_ms(
    previous: MetricsSample | None, sample: MetricsSample, last_ms: float | None
) -> float | None:
    """Compute milliseconds per step between two samples; ``last_ms`` when no step ran
    in between; None after a restart (the counters went back) until steps show again."""
    if previous is None:
        return last_ms
    steps = sample.steps - previous.steps
    seconds = sample.step_seconds - previous.step_seconds
    if steps < 0 or seconds < 0:  # the node restarted: its counters began again
        return None
    if steps == 0:
        return last_ms
    return 1000.0 * seconds / steps


def metrics_reader(admin_token: str | None, timeout_s: float = 5.0) -> LoadReader:
    """Read ``/metrics`` of the node at ``url``, pinned to the certificate it was verified with."""
    headers = {"Authorization": f"Bearer {admin_token}"} if admin_token else {}

    async def read(url: str, certificate_pem: bytes) -> str:
        target = url.replace("wss://", "https://", 1).removesuffix("/pipeline") + "/metrics"
        context = pinned_client_context(certificate_pem)
        async with (
            httpx.AsyncClient(verify=context, timeout=timeout_s) as client,
            client.stream("GET", target, headers=headers) as response,
        ):
            response.raise_for_status()
            body = b""
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > MAX_METRICS_BYTES:
                    raise ValueError("the metrics are too large")
            return body.decode("utf-8", errors="replace")

    return read
