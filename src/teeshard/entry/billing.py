"""The entry node's view of billing: reserve before generating, settle after.

``Billing`` is what the generation loop calls; a ledger backend implements it
(see ``teeshard.ledger``). ``FreeBilling`` is the default when no ledger is
configured: every request is allowed and nothing is recorded.

Contract for implementations:
- ``reserve`` raises ``APIError`` (401 unknown key, 402 no balance) or returns a
  ``Reservation`` holding the most the request can cost;
- exactly one of ``settle`` or ``release`` follows each reservation;
- both are idempotent by request id.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class ChargeRequest:
    request_id: str
    api_key: str | None  # the caller's bearer token; None when the request had none
    model: str
    prompt_tokens: int
    max_completion_tokens: int
    prompt_chars: int | None = None  # for per-character pricing


@dataclass(frozen=True)
class Reservation:
    request_id: str
    account: str | None  # None: free use (no ledger, or an operator of a registered node)
    reserved: int  # most the request can cost, in the ledger's smallest unit


@dataclass(frozen=True)
class Settlement:
    request_id: str
    prompt_tokens: int
    completion_tokens: int
    cost: int  # charged, in the ledger's smallest unit
    balance: int | None = None  # the account's balance after the charge, when known


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
    ) -> Settlement: ...

    async def release(self, reservation: Reservation) -> None: ...


class FreeBilling:
    """No ledger: every request is free and nothing is recorded."""

    async def reserve(self, request: ChargeRequest) -> Reservation:
        return Reservation(request.request_id, None, 0)

    async def settle(
        self,
        reservation: Reservation,
        prompt_tokens: int,
        completion_tokens: int,
        served_by: Sequence[str],
        *,
        completion_chars: int | None = None,  # for per-character pricing
    ) -> Settlement:
        return Settlement(reservation.request_id, prompt_tokens, completion_tokens, 0)

    async def release(self, reservation: Reservation) -> None:
        return None
