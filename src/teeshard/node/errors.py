"""Errors a node reports on the pipeline, each with a code and the HTTP status it maps to.

NodeError
├── BadRequestError      400  malformed frame, wrong shape or dtype, bad token ids
│   └── CacheFullError   400  a step would pass the session's maximum length
├── UnknownSessionError  404  session id never opened, closed, or evicted
├── OverloadedError      503  admission control: session or token budget spent
├── DownstreamError      502  the next node failed or is unreachable
└── AcceleratorFailedError 502  TSQP: the accelerator failed a check or did not answer
"""

from __future__ import annotations


class NodeError(Exception):
    code = "internal_error"
    status = 500

    def __init__(self, message: str, *, code: str | None = None, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status


class BadRequestError(NodeError):
    code = "bad_request"
    status = 400


class CacheFullError(BadRequestError):
    code = "context_length_exceeded"


class UnknownSessionError(NodeError):
    code = "unknown_session"
    status = 404


class OverloadedError(NodeError):
    code = "overloaded"
    status = 503


class DownstreamError(NodeError):
    """``node``: for ``downstream_failed``, the URL of the node that failed (a transport
    fault the entry may route around); None when it is not known."""

    code = "downstream_failed"
    status = 502

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        status: int | None = None,
        node: str | None = None,
    ) -> None:
        super().__init__(message, code=code, status=status)
        self.node = node

    @property
    def transport_fault(self) -> bool:
        """A node died, timed out or dropped the link: worth another route. Attestation
        failures and bad input are never retried."""
        return self.code == "downstream_failed" and self.node is not None


class AcceleratorFailedError(NodeError):
    code = "accelerator_failed"
    status = 502
