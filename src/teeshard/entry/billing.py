"""The entry node's view of billing: reserve before generating, settle after.

``Billing`` is what the generation loop calls; ``teeshard.ledger.billing.LedgerBilling``
implements it over any ledger and raises ledger errors, and ``BillingAPI`` wraps it
so that those errors leave as HTTP API errors (401 no or unknown key, 402 no
balance, 503 ledger unavailable, 500 otherwise). With no ledger configured the
generation loop has no billing at all: every request is free and nothing is recorded.

Contract for implementations:
- ``reserve`` returns a ``Reservation`` holding the most the request can cost;
- exactly one of ``settle`` or ``release`` follows each reservation;
- both are idempotent by request id; ``release`` never raises.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from teeshard.attest.receipts import Receipt
from teeshard.entry.errors import APIError
from teeshard.ledger.billing import (
    BillingError,
    ChargeRequest,
    IdempotentReplay,
    InvalidKey,
    LedgerUnavailable,
    MissingKey,
    PaymentRequired,
    Reservation,
    Settlement,
)
from teeshard.ledger.interface import LedgerError

__all__ = [
    "Billing",
    "BillingAPI",
    "ChargeRequest",
    "Reservation",
    "Settlement",
    "api_error_for",
]


class Billing(Protocol):
    async def reserve(self, request: ChargeRequest) -> Reservation: ...

    async def settle(
        self,
        reservation: Reservation,
        prompt_tokens: int,
        completion_tokens: int,
        served_by: Sequence[str],
        *,
        completion_chars: int | None = None,  # for per-character pricing
        receipts: Sequence[Receipt] = (),  # the stages' signed receipts: what credits work
    ) -> Settlement: ...

    async def release(self, reservation: Reservation) -> None: ...


_STATUS: tuple[tuple[type[BillingError], int], ...] = (
    (MissingKey, 401),
    (InvalidKey, 401),
    (PaymentRequired, 402),
    (LedgerUnavailable, 503),
    (IdempotentReplay, 409),
)


def api_error_for(exc: LedgerError) -> APIError:
    """The HTTP face of a ledger error: its message and code, the status that fits."""
    for kind, status in _STATUS:
        if isinstance(exc, kind):
            return APIError(status, exc.message, code=exc.code)
    if isinstance(exc, BillingError):
        return APIError(500, exc.message, code=exc.code)
    return APIError(500, f"ledger error: {exc.message}", code=exc.code)


class BillingAPI:
    """Any ``Billing`` whose ledger errors leave as ``APIError``s."""

    def __init__(self, billing: Billing) -> None:
        self.billing = billing

    async def reserve(self, request: ChargeRequest) -> Reservation:
        try:
            return await self.billing.reserve(request)
        except LedgerError as exc:
            raise api_error_for(exc) from None

    async def settle(
        self,
        reservation: Reservation,
        prompt_tokens: int,
        completion_tokens: int,
        served_by: Sequence[str],
        *,
        completion_chars: int | None = None,
        receipts: Sequence[Receipt] = (),
    ) -> Settlement:
        try:
            return await self.billing.settle(
                reservation,
                prompt_tokens,
                completion_tokens,
                served_by,
                completion_chars=completion_chars,
                receipts=receipts,
            )
        except LedgerError as exc:
            raise api_error_for(exc) from None

    async def release(self, reservation: Reservation) -> None:
        await self.billing.release(reservation)

    def close(self) -> None:
        close = getattr(self.billing, "close", None)
        if close is not None:
            close()
