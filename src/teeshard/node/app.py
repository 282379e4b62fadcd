"""The node's ASGI app: the pipeline socket, health, metrics and, on the entry node, the API."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import psutil
from fastapi import FastAPI, WebSocket
from fastapi.responses import PlainTextResponse

from teeshard.entry.console_api import build_console_router
from teeshard.entry.routes import build_router, install_error_handlers
from teeshard.entry.sealed import build_sealed_router
from teeshard.entry.serving import OpenAIServing
from teeshard.node.attestation_routes import build_attestation_router
from teeshard.node.config import NodeConfig
from teeshard.node.errors import NodeError
from teeshard.node.pipeline import serve_pipeline
from teeshard.node.service import NodeService
from teeshard.node.trust import NodeTrust
from teeshard.transport.peer import PeerClient, PeerError

log = logging.getLogger(__name__)


def create_app(
    service: NodeService,
    config: NodeConfig,
    trust: NodeTrust,
    serving: OpenAIServing | None = None,
) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        tasks = [asyncio.create_task(_evict_idle(service))]
        if service.downstream is not None:
            tasks.append(asyncio.create_task(_connect_downstream(service.downstream)))
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await service.shutdown()
            if serving is not None:
                serving.generator.close()

    app = FastAPI(title="teeshard node", lifespan=lifespan, docs_url=None, redoc_url=None)
    install_error_handlers(app)
    app.state.service = service

    @app.websocket("/pipeline")
    async def pipeline(websocket: WebSocket) -> None:
        await serve_pipeline(websocket, service)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {**health_report(service, config), "attestation": trust.summary()}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> str:
        return service.metrics.render()

    app.include_router(build_attestation_router(trust))
    if serving is not None:
        app.include_router(
            build_console_router(serving, trust, lambda: health_report(service, config))
        )
        app.include_router(build_router(serving))
        app.include_router(build_sealed_router(app, trust))
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
        "next": service.downstream.stats() if service.downstream is not None else None,
    }


async def _connect_downstream(peer: PeerClient) -> None:
    """Attest and connect to the next node at start, so problems show at once.

    Failures are logged and retried with backoff; requests also (re)connect lazily.
    """
    delay = 0.5
    while not peer.connected:
        try:
            await peer.connect()
        except (PeerError, NodeError) as exc:
            log.warning("next node not ready (%s); retrying in %.0fs", exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)


async def _evict_idle(service: NodeService) -> None:
    interval = max(0.05, min(service.sessions.limits.idle_timeout_s / 4, 30.0))
    while True:
        await asyncio.sleep(interval)
        service.evict_idle()
