"""HTTP routes of the entry node. Thin: parse, call the serving logic, return."""

from __future__ import annotations

import hashlib
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from teeshard.entry.errors import APIError
from teeshard.entry.protocol import (
    EXTENSIONS,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    GenerateRequest,
    TokenizeRequest,
    error_body,
)
from teeshard.entry.serving import Caller, OpenAIServing


def attach_router(app: FastAPI, serving: OpenAIServing) -> None:
    """Serve the OpenAI-compatible API of ``serving`` on ``app`` (the console: ``console_api``)."""
    router = APIRouter()

    @router.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return serving.models()

    @router.get("/v1/models/{model_id:path}")
    async def retrieve_model(model_id: str) -> dict[str, Any]:
        return serving.model(model_id)

    @router.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict[str, Any]:
        return serving.tokenize(body)

    @router.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict[str, Any]:
        return serving.detokenize(body)

    @router.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await serving.chat(body, await caller_of(request))

    @router.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await serving.completions(body, await caller_of(request))

    @router.post("/generate", response_model=None)
    async def generate(body: GenerateRequest, request: Request) -> Response:
        return await serving.generate(body, await caller_of(request))

    app.include_router(router)


# the ledger keeps 128 characters; n > 1 adds "#<index>" for each choice after the first
MAX_IDEMPOTENCY_KEY = 124


async def caller_of(request: Request) -> Caller:
    """The caller's key, the digest of its exact request bytes (for the receipts), and
    its ``Idempotency-Key`` if it sent one."""
    body = await request.body()  # starlette caches it: the same bytes the model parsed
    key = request.headers.get("idempotency-key")
    if key is not None and not (0 < len(key) <= MAX_IDEMPOTENCY_KEY and key.isprintable()):
        raise APIError(
            400,
            f"Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} printable characters",
            code="invalid_idempotency_key",
        )
    return Caller(
        bearer_token(request.headers.get("authorization")),
        hashlib.sha256(body).digest(),
        key,
        gone=request.is_disconnected,
    )


def bearer_token(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise APIError(
            401, "Authorization header must be 'Bearer <api key>'", code="invalid_authorization"
        )
    return token.strip()


def install_error_handlers(app: FastAPI) -> None:
    """Every error leaves in the OpenAI error shape."""

    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers or None)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = (
            exc.errors()[0] if exc.errors() else {"type": "", "loc": (), "msg": "invalid request"}
        )
        if first.get("type") == "json_invalid":
            return JSONResponse(
                error_body(
                    "request body is not valid JSON", "invalid_request_error", code="invalid_json"
                ),
                status_code=400,
            )
        location = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(location) or None
        message = f"{param}: {first['msg']}" if param else str(first["msg"])
        if first.get("type") == "extra_forbidden":
            message = (
                f"unknown field {param!r}: teeshard takes OpenAI's fields and the extensions "
                f"{', '.join(EXTENSIONS)}"
            )
        return JSONResponse(error_body(message, "invalid_request_error", param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(message, kind), status_code=exc.status_code)
