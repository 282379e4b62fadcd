"""The node process's ASGI app: each part attaches its own routes.

The factory knows which parts a node has, not their endpoints: the pipeline
socket (``teeshard.node``, on every node after the first: tokens enter the
first stage only through its API), the attestation routes (here), and on the
entry node the OpenAI-compatible API and sealed requests (``teeshard.entry``).
Parts find what they serve through ``app.state``. Every request passes the
edge's body limit; ``/metrics`` and the detailed ``/health`` are for the admin
token or a loopback-only node (``teeshard.server.edge``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import psutil
from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse

from teeshard.entry import (
    APIError,
    OpenAIServing,
    attach_console,
    attach_network_routes,
    attach_router,
    attach_sealed_router,
    install_error_handlers,
)
from teeshard.entry.admission import queue_metrics
from teeshard.entry.network_routes import network_metrics
from teeshard.ledger import Ledger, LedgerBilling, LedgerError
from teeshard.ledger.registration import AttestVerifier, ExpectedShards, renew_admissions
from teeshard.node import NodeService, attach_pipeline, stage_metrics
from teeshard.server.attestation_routes import attach_attestation_routes
from teeshard.server.config import NodeConfig
from teeshard.server.edge import BodyLimit, may_see_detail, public_health
from teeshard.server.trust import NodeTrust

log = logging.getLogger(__name__)


def create_app(
    service: NodeService,
    config: NodeConfig,
    trust: NodeTrust,
    serving: OpenAIServing | None = None,
) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.loop = asyncio.get_running_loop()  # for in-process callers on other threads
        tasks = [
            asyncio.create_task(_evict_idle(service)),
            asyncio.create_task(trust.attestation.keep_fresh()),  # re-key, re-quote before expiry
        ]
        if service.next_hop is not None:
            tasks.append(asyncio.create_task(service.next_hop.keep_connected()))
        ledger = _ledger_of(serving)
        if ledger is not None and trust.policy.manifests:
            tasks.append(asyncio.create_task(_readmit(ledger, trust, config.readmit_every_s)))
        registry = serving.generations.registry if serving is not None else None
        if registry is not None:
            await registry.probe_all()  # attest the network once before the first route
            tasks.append(asyncio.create_task(registry.probe_forever()))
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await service.shutdown()
            if serving is not None:
                serving.generations.shutdown()

    app = FastAPI(title="teeshard node", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.service = service
    app.state.trust = trust
    app.add_middleware(BodyLimit, max_bytes=config.max_body_bytes)
    install_error_handlers(app)
    if not service.shard.is_first:
        attach_pipeline(app, service, trust, config.pipeline)
    attach_attestation_routes(app, trust, config.operator, config.resolved_node_id)
    metrics = stage_metrics(service)

    @app.get("/health")
    async def health(request: Request) -> dict[str, Any]:
        if not may_see_detail(request, config):
            return public_health(trust.attestation.evidence.insecure)
        return {**health_report(service, config), "attestation": trust.summary()}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics_text(request: Request) -> str:
        if not may_see_detail(request, config):
            raise APIError(
                403,
                "metrics are for the admin token (TEESHARD_ADMIN_TOKEN, as 'Authorization: "
                "Bearer ...') or a node bound to loopback",
                code="admin_only",
            )
        return metrics.render()

    if serving is not None:
        app.state.serving = serving
        registry = serving.generations.registry
        if registry is not None:
            network_metrics(metrics, registry)
        queue_metrics(metrics, serving.generations.admission)
        attach_network_routes(app, registry, lambda request: may_see_detail(request, config))
        attach_router(app, serving)
        attach_console(app, serving, trust, lambda request: (
            health_report(service, config) if may_see_detail(request, config)
            else public_health(trust.attestation.evidence.insecure)))  # fmt: skip
        attach_sealed_router(app, trust.attestation.identities)  # newest first: follows a re-key
    return app


def health_report(service: NodeService, config: NodeConfig) -> dict[str, Any]:
    shard = service.shard
    limits = service.sessions.limits
    return {
        "status": "ok",
        "model": service.model_name,
        "layers": [shard.layer_range.start, shard.layer_range.end],
        "num_layers": shard.spec.num_layers,
        "entry": config.entry,
        "dtype": config.dtype,
        "quantize": config.quantize,
        "wire_dtype": config.wire_dtype,
        "sessions": {
            "open": len(service.sessions),
            "reserved_tokens": service.sessions.reserved_tokens,
            "max_sessions": limits.max_sessions,
            "max_cached_tokens": limits.max_cached_tokens,
            "evicted_total": service.sessions.evicted_total,
        },
        "memory": {"rss_bytes": psutil.Process().memory_info().rss},
        "next": service.next_hop.stats() if service.next_hop is not None else None,
    }


def _ledger_of(serving: OpenAIServing | None) -> Ledger | None:
    billing = serving.generations.billing if serving is not None else None
    inner = billing.billing if billing is not None else None
    return inner.ledger if isinstance(inner, LedgerBilling) else None


async def _readmit(ledger: Ledger, trust: NodeTrust, every_s: float) -> None:
    """The entry's duty to the pool: attest every registered node again, each period, so
    admissions (and operators' free use) last only while nodes are live and genuine."""
    expected = ExpectedShards.from_policy(trust.policy)
    verifier = AttestVerifier(trust.policy, trust.collateral)
    while True:
        try:
            renewal = await asyncio.to_thread(renew_admissions, ledger, expected, verifier)
            if renewal.refused:
                log.warning("%d registered nodes not re-admitted", len(renewal.refused))
        except LedgerError as exc:
            log.warning("re-admitting the pool's nodes failed: %s", exc.code)
        await asyncio.sleep(every_s)


async def _evict_idle(service: NodeService) -> None:
    limits = service.sessions.limits
    shortest = min(limits.idle_timeout_s, limits.unstepped_timeout_s)
    interval = max(0.05, min(shortest / 4, 30.0))
    while True:
        await asyncio.sleep(interval)
        service.evict_idle()
