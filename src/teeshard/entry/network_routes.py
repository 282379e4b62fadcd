"""``GET /v1/network`` and the network's Prometheus counters, on the entry node.

Anyone may see the ranges and how many usable nodes serve each; the nodes
themselves (URLs, attestation, health, load, bans, routes in use) are detail,
behind the same rule as the detailed ``/health`` (the admin token, or a node on
loopback): they tell how busy the network is.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request

from teeshard.entry.registry import Registry
from teeshard.node.metrics import Metrics


def attach_network_routes(
    app: FastAPI, registry: Registry | None, may_see_detail: Callable[[Request], bool]
) -> None:
    @app.get("/v1/network")
    async def network(request: Request) -> dict[str, Any]:
        if registry is None:
            return {"routing": "static", "detail": False}
        described = registry.describe()
        if may_see_detail(request):
            return {"routing": "registry", "detail": True, **described}
        usable: dict[str, int] = {r: 0 for r in described["ranges"]}
        for node in described["nodes"]:
            usable[node["layers"]] += 1 if node["usable"] else 0
        return {
            "routing": "registry",
            "detail": False,
            "start": described["start"],
            "num_layers": described["num_layers"],
            "ranges": [{"layers": r, "usable_nodes": n} for r, n in usable.items()],
        }


def network_metrics(metrics: Metrics, registry: Registry) -> None:
    """Add the registry's counters to the entry's ``/metrics``."""
    metrics.counter("teeshard_failovers_total", "Sessions rebuilt on a new route mid-generation")
    metrics.counter(
        "teeshard_route_retries_total", "New routes tried after a transport fault (open or step)"
    )
    metrics.counter("teeshard_bans_total", "Nodes banned from new routes after a fault, by node")
    metrics.gauge(
        "teeshard_network_usable_nodes",
        "Nodes of the network usable for new routes",
        lambda: float(sum(1 for n in registry.describe()["nodes"] if n["usable"])),
    )

    def read() -> None:
        metrics.set("teeshard_failovers_total", registry.counters.failovers)
        metrics.set("teeshard_route_retries_total", registry.counters.retries)
        for url, count in registry.counters.bans.items():
            metrics.set("teeshard_bans_total", count, node=url)

    metrics.before_render(read)
