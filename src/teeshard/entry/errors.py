"""API errors in the OpenAI error shape, with the HTTP status that fits."""

from __future__ import annotations

from typing import Any

from teeshard.entry.protocol import error_body
from teeshard.node.errors import NodeError

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "insufficient_quota",
    403: "permission_error",
    404: "not_found_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    502: "upstream_error",
    503: "server_overloaded",
}


def _default_headers(status: int) -> dict[str, str]:
    return {"Retry-After": "1"} if status == 503 else {}


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        # e.g. Retry-After; a 503 without one gets Retry-After: 1
        self.headers = headers if headers is not None else _default_headers(status)

    @property
    def type(self) -> str:
        return _TYPES.get(self.status, "api_error")

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)

    @classmethod
    def from_node(cls, exc: NodeError) -> APIError:
        return cls(exc.status, exc.message, code=exc.code)
