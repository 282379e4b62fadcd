"""The entry node's registry: every node that can serve a layer range, and its state.

Sources: a network file (``--network FILE``, TOML)::

    [[nodes]]
    url = "wss://10.0.0.2:8001"
    layers = "11:22"

and/or the contribution pool (``--network-from-ledger``): the nodes the ledger has
admitted for this model, with their URL and range, re-read before every probe
round, so a node newly admitted is routed to within seconds and one removed, or
whose admission lapsed, is not. The ledger is what lets many entry nodes on many
hosts share one view of the network.

State per node, kept here: attestation (verified against the entry's policy by a
periodic probe, with when and the certificate fingerprint, or the reason it
failed), health (whether the last probe answered), load (sessions this entry
has open on it, and what the node's step counters say at each probe: recent
step time, sessions for every entry, steps in flight; ``teeshard.entry.node_load``),
and bans (a node that failed mid-session is left out of new
routes for ``ban_s`` seconds). Route choice itself is the pure
``teeshard.entry.routing.choose_route``.

Probing is the caller's I/O (``Prober``, wired by the process assembly to the
node's trust): a transport failure marks the node unhealthy, an attestation
failure marks it failed; either way it is not routed to until a later probe
succeeds. A node of the wrong range or model fails attestation.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import tomllib
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from teeshard.entry.node_load import LoadReader, MetricsSample, parse_metrics, recent_step_ms
from teeshard.entry.routing import Attestation, NodeView, Route, choose_route
from teeshard.ledger import Ledger
from teeshard.model.layer_range import LayerRange
from teeshard.node.hop import node_url

log = logging.getLogger(__name__)


OPENING_S = 10.0  # a chosen route counts as load this long, unless its session opens first


class NetworkFileError(ValueError):
    """The network file does not parse or describes an impossible network."""


class _NodeEntry(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    url: str = Field(pattern=r"^wss://[^\s/]+(/pipeline)?/?$")
    layers: str

    @field_validator("layers")
    @classmethod
    def _layers(cls, value: str) -> str:
        LayerRange.parse(value)
        return value


class _NetworkFile(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    nodes: list[_NodeEntry] = Field(min_length=1)


@dataclass(frozen=True)
class NetworkNode:
    url: str
    layers: LayerRange


def load_network(path: Path) -> list[NetworkNode]:
    """The nodes of a network file; ``NetworkFileError`` saying what is wrong."""
    try:
        parsed = _NetworkFile.model_validate(tomllib.loads(path.read_text()))
    except (OSError, tomllib.TOMLDecodeError, ValidationError) as exc:
        raise NetworkFileError(f"network file {path}: {exc}") from None
    nodes = [NetworkNode(node_url(n.url), LayerRange.parse(n.layers)) for n in parsed.nodes]
    urls = Counter(n.url for n in nodes)
    twice = [u for u, count in urls.items() if count > 1]
    if twice:
        raise NetworkFileError(f"network file {path}: {', '.join(twice)} listed twice")
    return nodes


@dataclass(frozen=True)
class ProbeResult:
    """A node proved itself: its attested certificate and layers, as verified."""

    fingerprint: str
    layers: LayerRange
    certificate_pem: bytes = b""  # the verified certificate: what reading its load pins


class ProbeAttestationError(Exception):
    """The node answered, but its attestation was refused (or it serves other layers)."""


# url -> ProbeResult; raises ProbeAttestationError (refused) or OSError (unreachable)
Prober = Callable[[str], Awaitable[ProbeResult]]
# Lists the nodes a dynamic source knows now (blocking: runs on a worker thread).
NodeSource = Callable[[], Sequence[NetworkNode]]


def ledger_nodes(ledger: Ledger, model: str) -> list[NetworkNode]:
    """The nodes ``ledger`` admits now for ``model``, as routes name them (``wss://``)."""
    nodes = []
    for record in ledger.nodes():
        if not record.admitted or (record.model and record.model != model):
            continue
        try:
            layers = LayerRange.parse(record.layers)
        except ValueError:
            log.warning("admitted node %s has no valid layer range; skipped", record.node_id)
            continue
        url = (
            record.url.replace("https://", "wss://", 1)
            if record.url.startswith("https://")
            else record.url
        )
        if url.startswith("wss://"):
            nodes.append(NetworkNode(node_url(url), layers))
    return nodes


@dataclass
class NodeRecord:
    url: str
    layers: LayerRange
    attestation: Attestation = "unknown"
    attested_at: float | None = None  # wall-clock seconds of the last verification
    fingerprint: str | None = None
    problem: str | None = None  # why the last probe failed
    healthy: bool = True
    banned_until: float = 0.0  # monotonic
    ban_reason: str | None = None
    sessions: int = 0  # open sessions of this entry routed through the node
    # from the node's step counters at the last probe that could read them
    sample: MetricsSample | None = None
    step_ms: float | None = None  # recent compute per step

    def view(self) -> NodeView:
        sample = self.sample
        return NodeView(
            self.url, self.layers, self.attestation, self.healthy, self.banned_until,
            self.sessions, self.step_ms, sample.sessions if sample else 0,
            sample.in_flight if sample else 0,
        )  # fmt: skip


@dataclass
class RegistryCounters:
    failovers: int = 0  # sessions rebuilt on a new route mid-generation
    retries: int = 0  # route attempts after a transport fault (opens and rebuilds)
    bans: Counter[str] = field(default_factory=Counter)  # by node URL


class Registry:
    def __init__(
        self,
        nodes: Sequence[NetworkNode],
        start: int,
        num_layers: int,
        prober: Prober | None = None,
        ban_s: float = 30.0,
        probe_interval_s: float = 5.0,
        probe_timeout_s: float = 10.0,
        source: NodeSource | None = None,
        load_reader: LoadReader | None = None,
    ) -> None:
        self.start, self.num_layers = start, num_layers
        self.load_reader = load_reader  # None: route by this entry's sessions only
        self.records = {n.url: NodeRecord(n.url, n.layers) for n in nodes}
        self.fixed = frozenset(self.records)  # from the network file: never dropped
        self.source = source
        self.prober = prober
        self.ban_s = ban_s
        self.probe_interval_s = probe_interval_s
        self.probe_timeout_s = probe_timeout_s
        self.counters = RegistryCounters()
        self.routes: dict[str, Route] = {}  # session id -> its route, while open
        # routes chosen whose session is still opening: counted as load until ``hold``
        # (or OPENING_S), so a burst of sessions chosen at once spreads over replicas
        self._opening: list[tuple[float, Route]] = []
        self._salt = itertools.count()
        if prober is None:  # nothing to verify with: the hops' own checks are the guard
            for record in self.records.values():
                record.attestation = "verified"

    # -- routes ----------------------------------------------------------------------

    def choose(self) -> Route:
        """A route for a new session (``NoRouteError`` when the nodes cannot cover it)."""
        now = time.monotonic()
        self._opening = [(until, route) for until, route in self._opening if until > now]
        opening = Counter(url for _, route in self._opening for url in route)
        views = [replace(r.view(), load=r.sessions + opening[r.url]) for r in self.records.values()]
        route = choose_route(views, self.start, self.num_layers, now, next(self._salt))
        self._opening.append((now + OPENING_S, route))
        return route

    def hold(self, session_id: str, route: Route) -> None:
        """Count ``route`` as carrying ``session_id`` (its load) until ``drop``."""
        for index, (_, opening) in enumerate(self._opening):
            if opening == route:  # its session opened: counted by ``sessions`` from now
                del self._opening[index]
                break
        self.drop(session_id)
        self.routes[session_id] = route
        for url in route:
            if url in self.records:
                self.records[url].sessions += 1

    def drop(self, session_id: str) -> None:
        for url in self.routes.pop(session_id, ()):
            if url in self.records:
                self.records[url].sessions -= 1

    def ban(self, url: str, reason: str) -> None:
        """Leave ``url`` out of new routes for ``ban_s`` seconds."""
        url = node_url(url)
        record = self.records.get(url)
        self.counters.bans[url] += 1
        log.warning("banned %s for %.0fs: %s", url, self.ban_s, reason)
        if record is not None:
            record.banned_until = time.monotonic() + self.ban_s
            record.ban_reason = reason

    # -- probes ----------------------------------------------------------------------

    async def refresh(self) -> None:
        """Re-read the dynamic source: add the nodes it lists now, drop those it no longer
        does (sessions already routed through one keep their route until they end)."""
        if self.source is None:
            return
        try:
            listed = await asyncio.to_thread(self.source)
        except Exception as exc:  # a ledger hiccup: keep the last view, say so
            log.warning("could not re-read the network's nodes: %s", type(exc).__name__)
            return
        now = {n.url: n for n in listed}
        for url, node in now.items():
            record = self.records.get(url)
            if record is None or record.layers != node.layers:
                self.records[url] = NodeRecord(url, node.layers)
                if self.prober is None:
                    self.records[url].attestation = "verified"
                log.info("network: node %s (layers %s) joined", url, node.layers)
        for url in [u for u in self.records if u not in now and u not in self.fixed]:
            del self.records[url]
            log.info("network: node %s left", url)

    async def probe_all(self) -> None:
        await self.refresh()
        if self.prober is None:
            return
        await asyncio.gather(*(self._probe(r) for r in list(self.records.values())))

    async def probe_forever(self) -> None:
        while True:
            await self.probe_all()
            await asyncio.sleep(self.probe_interval_s)

    async def _probe(self, record: NodeRecord) -> None:
        assert self.prober is not None
        try:
            result = await asyncio.wait_for(self.prober(record.url), self.probe_timeout_s)
        except ProbeAttestationError as exc:
            if record.attestation != "failed":
                log.error("node %s failed attestation: %s", record.url, exc)
            record.attestation, record.problem, record.healthy = "failed", str(exc), True
            return
        except (OSError, TimeoutError) as exc:
            record.healthy, record.problem = False, f"unreachable: {exc}"
            return
        if result.layers != record.layers:
            record.attestation = "failed"
            record.problem = f"attested for layers {result.layers}, listed for {record.layers}"
            return
        if record.fingerprint != result.fingerprint:
            log.info("node %s attested, certificate %s", record.url, result.fingerprint[:16])
        record.attestation, record.healthy, record.problem = "verified", True, None
        record.fingerprint, record.attested_at = result.fingerprint, time.time()
        await self._read_load(record, result.certificate_pem)

    async def _read_load(self, record: NodeRecord, certificate_pem: bytes) -> None:
        """The node's step counters now; without them (refused, unreadable) it is routed by
        this entry's sessions alone."""
        if self.load_reader is None or not certificate_pem:
            return
        try:
            text = await asyncio.wait_for(
                self.load_reader(record.url, certificate_pem), self.probe_timeout_s
            )
            sample = parse_metrics(text)
        except (OSError, TimeoutError, ValueError, httpx.HTTPError) as exc:
            if record.sample is not None or record.step_ms is not None:
                log.info("node %s: no step load (%s)", record.url, type(exc).__name__)
            record.sample, record.step_ms = None, None
            return
        record.step_ms = recent_step_ms(record.sample, sample, record.step_ms)
        record.sample = sample

    # -- what /v1/network shows --------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        now = time.monotonic()
        ranges = sorted({str(r.layers) for r in self.records.values()}, key=_range_key)
        return {
            "start": self.start,
            "num_layers": self.num_layers,
            "ranges": ranges,
            "nodes": [
                {
                    "url": r.url,
                    "layers": str(r.layers),
                    "attestation": r.attestation,
                    "attested_at": r.attested_at,
                    "fingerprint": r.fingerprint,
                    "healthy": r.healthy,
                    "problem": r.problem,
                    "banned_for_s": round(max(0.0, r.banned_until - now), 1),
                    "ban_reason": r.ban_reason if r.banned_until > now else None,
                    "sessions": r.sessions,
                    "load": _load(r),
                    "usable": r.view().usable(now),
                }
                for r in sorted(self.records.values(), key=lambda r: (r.layers, r.url))
            ],
            "routes": [list(route) for route in self.routes.values()],
            "counters": {
                "failovers": self.counters.failovers,
                "retries": self.counters.retries,
                "bans": dict(self.counters.bans),
            },
        }


def _load(record: NodeRecord) -> dict[str, Any] | None:
    """What the node's step counters said at the last probe (None: not readable)."""
    if record.sample is None:
        return None
    step_ms = round(record.step_ms, 2) if record.step_ms is not None else None
    return {
        "step_ms": step_ms,
        "sessions": record.sample.sessions,
        "in_flight": record.sample.in_flight,
    }


def _range_key(text: str) -> tuple[int, int]:
    layers = LayerRange.parse(text)
    return layers.start, layers.end
