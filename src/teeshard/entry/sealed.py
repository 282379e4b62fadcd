"""``POST /v1/sealed``: requests sealed end to end to the entry node's attested key.

A client that verified this node's bundle seals ``(path, body)`` with HPKE to the
sealing key bound into the quote; an ingress outside the TEE then sees only
ciphertext. The node opens it, runs the inner request against its own API in
process, and seals the whole response (status and body) back to the client.
A streamed inner request is answered once, when complete.
"""

from __future__ import annotations

import httpx
from fastapi import APIRouter, FastAPI, Request, Response

from teeshard.attest import (
    SEALED_CONTENT_TYPE,
    SEALED_PATH,
    AttestationError,
    NodeIdentity,
    open_request,
)
from teeshard.entry.errors import APIError

SEALABLE_PATHS = ("/v1/chat/completions", "/v1/completions", "/generate")


def attach_sealed_router(app: FastAPI, identity: NodeIdentity) -> None:
    """Serve ``/v1/sealed`` on ``app``: requests opened with ``identity``'s sealing key."""
    router = APIRouter()

    @router.post(SEALED_PATH)
    async def sealed(request: Request) -> Response:
        if request.headers.get("content-type", "").split(";")[0].strip() != SEALED_CONTENT_TYPE:
            raise APIError(415, f"sealed requests must be sent as {SEALED_CONTENT_TYPE}")
        try:
            opened = open_request(identity, await request.body())
        except AttestationError as exc:
            raise APIError(
                400, f"sealed request rejected: {exc}", code="sealed_request_invalid"
            ) from None
        if opened.path not in SEALABLE_PATHS:
            raise APIError(
                400, f"{opened.path} cannot be sealed (use one of {', '.join(SEALABLE_PATHS)})"
            )
        headers = {"content-type": "application/json"}
        if "authorization" in request.headers:
            headers["authorization"] = request.headers["authorization"]
        # In process: the opened request never leaves this node, not even to loopback.
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://entry.internal", timeout=None
        ) as client:
            inner = await client.post(opened.path, content=opened.body, headers=headers)
        return Response(
            opened.seal_response(inner.status_code, inner.content), media_type=SEALED_CONTENT_TYPE
        )

    app.include_router(router)
