"""Route choice, pure: which node serves each stretch of layers for one session.

The entry node serves layers ``[0, start)`` itself; a route is the nodes after it,
nearest first, whose ranges run contiguously from ``start`` to the model's end.
Ranges of replicas need not line up (one node may serve 8:16, another 8:12 and a
third 12:16): any chain of compatible ranges will do.

Rules, in order:

1. only usable nodes: attested (verified against the entry's policy), healthy
   (their last probe answered), not banned at ``now``;
2. the least expected time per token (``route_cost``): over the route's nodes,
   each node's step time times the work it shares the node with, plus
   ``hop_ms`` per hop (a round trip per token). A node's step time is what its
   step counters measured (``step_ms``, from its ``/metrics`` at the registry's
   last probe); a node not measured yet is estimated at the mean per-layer time of
   the nodes that are (1 ms a layer when none is). The work it shares the node
   with: ``1 + queue + in_flight``, where ``queue`` is the most of the sessions this
   entry has open on it (``load``, always current) and the sessions the node said
   it holds for every entry (``sessions``), and ``in_flight`` the steps it was
   running at the probe;
3. the fewest hops;
4. among routes equal on both, ``salt`` picks one, so that sessions opened one
   after another spread over replicas even before their load shows.

No I/O here: the registry (``teeshard.entry.registry``) supplies the views.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from typing import Literal

from teeshard.model.layer_range import LayerRange

Attestation = Literal["unknown", "verified", "failed"]
Route = tuple[str, ...]  # node URLs after the entry, nearest first


class NoRouteError(Exception):
    """No usable nodes cover every layer; ``gap`` is the first layer nothing serves."""

    def __init__(self, message: str, gap: int) -> None:
        super().__init__(message)
        self.message = message
        self.gap = gap


@dataclass(frozen=True)
class NodeView:
    """What route choice needs to know of one node."""

    url: str
    layers: LayerRange
    attestation: Attestation = "unknown"
    healthy: bool = True
    banned_until: float = 0.0  # monotonic seconds; 0: never banned
    load: int = 0  # sessions this entry has open on the node
    # measured by the node's step counters at the last probe (None/0: not known)
    step_ms: float | None = None  # recent local compute per step, milliseconds
    sessions: int = 0  # sessions the node holds, for every entry
    in_flight: int = 0  # steps it was running

    def usable(self, now: float) -> bool:
        return self.attestation == "verified" and self.healthy and self.banned_until <= now


DEFAULT_LAYER_MS = 1.0  # per layer, when no node of the network has been measured
HOP_MS = 1.0  # what a hop adds per token (a round trip), in the same units


def layer_ms(nodes: Sequence[NodeView]) -> float:
    """The mean measured step time per layer over ``nodes`` (the estimate for the others)."""
    known = [n.step_ms / len(n.layers) for n in nodes if n.step_ms is not None and n.step_ms > 0]
    return sum(known) / len(known) if known else DEFAULT_LAYER_MS


def node_cost(node: NodeView, per_layer_ms: float) -> float:
    """Expected milliseconds per token on ``node``: its step time times the work it shares."""
    step = node.step_ms if node.step_ms is not None and node.step_ms > 0 else None
    step_ms = step if step is not None else per_layer_ms * len(node.layers)
    return step_ms * (1 + max(node.load, node.sessions) + node.in_flight)


def choose_route(
    nodes: Sequence[NodeView],
    start: int,
    end: int,
    now: float,
    salt: int = 0,
    hop_ms: float = HOP_MS,
) -> Route:
    """The best route over layers ``[start, end)`` (see the module docstring).

    Raises ``NoRouteError`` naming the first layer no usable node can reach.
    """
    if start == end:
        return ()
    usable = [n for n in nodes if n.usable(now) and start <= n.layers.start < end]
    by_start: dict[int, list[NodeView]] = {}
    for node in usable:
        if node.layers.end <= end:
            by_start.setdefault(node.layers.start, []).append(node)

    per_layer = layer_ms(usable)
    Cost = tuple[int, int]  # (expected microseconds per token, hops)

    @cache
    def best(position: int) -> tuple[Cost, Route] | None:
        if position == end:
            return (0, 0), ()
        options: list[tuple[Cost, str, Route]] = []
        for node in by_start.get(position, ()):
            rest = best(node.layers.end)
            if rest is None:
                continue
            (micros, hops), route = rest
            mine = round(1000 * (node_cost(node, per_layer) + hop_ms))  # ties compare exactly
            options.append(((micros + mine, hops + 1), node.url, route))
        if not options:
            return None
        lowest = min(cost for cost, _, _ in options)
        ties = sorted((url, route) for cost, url, route in options if cost == lowest)
        url, route = ties[salt % len(ties)]
        return lowest, (url, *route)

    found = best(start)
    if found is None:
        raise NoRouteError(_explain_gap(nodes, usable, start, end, now), _first_gap(usable, start))
    return found[1]


def _first_gap(usable: Sequence[NodeView], start: int) -> int:
    """The first layer that no chain of usable nodes starting at ``start`` reaches."""
    reach = {start}
    frontier = [start]
    while frontier:
        position = frontier.pop()
        for node in usable:
            if node.layers.start == position and node.layers.end not in reach:
                reach.add(node.layers.end)
                frontier.append(node.layers.end)
    return max(reach)


def _explain_gap(
    nodes: Sequence[NodeView], usable: Sequence[NodeView], start: int, end: int, now: float
) -> str:
    gap = _first_gap(usable, start)
    there = [n for n in nodes if n.layers.start == gap]
    if not there:
        return f"no node in the network serves layers from {gap} (of {start}:{end})"
    states = ", ".join(f"{n.url} {_state(n, now)}" for n in there)
    return f"no usable node serves layers from {gap}: {states}"


def _state(node: NodeView, now: float) -> str:
    if node.attestation != "verified":
        return f"attestation {node.attestation}"
    if not node.healthy:
        return "unreachable"
    if node.banned_until > now:
        return f"banned for {node.banned_until - now:.0f}s"
    return "does not lead to the last layer"
