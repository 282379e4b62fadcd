"""The node process's ASGI app: each part attaches its own routes.

The factory knows which parts a node has, not their endpoints: the pipeline
socket (``teeshard.node``), the attestation routes (here), and on the entry
node the OpenAI-compatible API and sealed requests (``teeshard.entry``). Parts
find what they serve through ``app.state``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import psutil
from fastapi import FastAPI
from fastapi.responses import PlainTextResponse

from teeshard.entry import (
    OpenAIServing,
    attach_router,
    attach_sealed_router,
    install_error_handlers,
)
from teeshard.node import NodeService, attach_pipeline, stage_metrics
from teeshard.server.attestation_routes import attach_attestation_routes
from teeshard.server.config import NodeConfig
from teeshard.server.trust import NodeTrust


def create_app(
    service: NodeService,
    config: NodeConfig,
    trust: NodeTrust,
    serving: OpenAIServing | None = None,
) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        tasks = [asyncio.create_task(_evict_idle(service))]
        if service.next_hop is not None:
            tasks.append(asyncio.create_task(service.next_hop.keep_connected()))
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
    install_error_handlers(app)
    attach_pipeline(app, service)
    attach_attestation_routes(app, trust)
    metrics = stage_metrics(service)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {**health_report(service, config), "attestation": trust.summary()}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics_text() -> str:
        return metrics.render()

    if serving is not None:
        app.state.serving = serving
        attach_router(app, serving)
        attach_sealed_router(app, trust.attestation.identity)
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


async def _evict_idle(service: NodeService) -> None:
    interval = max(0.05, min(service.sessions.limits.idle_timeout_s / 4, 30.0))
    while True:
        await asyncio.sleep(interval)
        service.evict_idle()
