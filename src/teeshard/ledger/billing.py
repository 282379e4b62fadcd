"""Charging requests through any ``Ledger``: reserve, settle, release.

Plug-in (the entry node wraps it in ``teeshard.entry.billing.BillingAPI``, which
turns the errors below into HTTP statuses)::

    billing = billing_from_url("sqlite:///ledger.db", pricing="pricing.toml", actor="entry-1")

Behaviour:
- no API key: ``MissingKey``; a key no account has: ``InvalidKey``; not enough
  balance for the most the request can cost: ``PaymentRequired`` with both numbers;
- operators of admitted nodes use the model free (cost 0 in the usage);
- per-token or per-character pricing (the entry passes character counts);
- settle charges the priced usage (never above what was reserved), releases
  the rest, and credits every admitted node of the serving chain with the
  request's model tokens; nodes not admitted are skipped, and free requests
  credit no work, so an operator cannot raise its share by using its own node;
- a failed release is logged (request id only) and left to recovery;
- at start, ``recover`` releases reservations this entry left behind.

Ledger calls block, so they run on a thread pool; the event loop never waits on
the database or the chain. Nothing here logs an API key, a prompt or a completion.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from teeshard.ledger.interface import (
    BackendError,
    InsufficientBalance,
    Ledger,
    LedgerError,
    UnknownAccount,
    UnknownNode,
    served_map,
)
from teeshard.ledger.pricing import Pricing, PricingError, Usage

log = logging.getLogger(__name__)
T = TypeVar("T")


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


class BillingError(LedgerError):
    """A request cannot be charged. Subclasses say why; the entry maps each to a status.

    BillingError
    ├── MissingKey         the request carried no API key
    ├── InvalidKey         no account holds that key
    ├── PaymentRequired    the balance cannot cover the most the request can cost
    ├── LedgerUnavailable  the store or chain failed: try again
    └── PricingFailed      the request cannot be priced (a configuration error)
    """

    code = "billing_error"


class MissingKey(BillingError):
    code = "missing_api_key"


class InvalidKey(BillingError):
    code = "invalid_api_key"


class PaymentRequired(BillingError):
    code = "insufficient_balance"


class LedgerUnavailable(BillingError):
    code = "ledger_unavailable"


class PricingFailed(BillingError):
    code = "pricing_error"


NODES_TTL_S = 30.0  # how long the list of admitted nodes is trusted
UNKNOWN_NODE_REFRESH_S = 2.0  # a chain naming a node not (yet) admitted looks again this soon


@dataclass(frozen=True)
class _Pending:
    model: str
    account: str
    free: bool
    prompt_chars: int | None = None


class LedgerBilling:
    def __init__(
        self,
        ledger: Ledger,
        pricing: Pricing | None = None,
        *,
        free_for_operators: bool = True,
        max_workers: int = 16,
    ) -> None:
        self.ledger = ledger
        self.pricing = pricing or Pricing()
        self.free_for_operators = free_for_operators
        self._executor = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="ledger")
        self._pending: dict[str, _Pending] = {}
        self._admitted: frozenset[str] = frozenset()
        self._admitted_at = 0.0

    async def _run(self, fn: Callable[..., T], *args: object) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def recover(self, older_than_s: float | None = None) -> list[str]:
        """Release what an earlier process of this entry left reserved (call at start)."""
        released = self.ledger.recover(older_than_s)
        if released:
            log.warning("released %d reservations left by an earlier run", len(released))
        return released

    def close(self) -> None:
        self._executor.shutdown(wait=True)
        self.ledger.close()

    # -- Billing ---------------------------------------------------------------------

    async def reserve(self, request: ChargeRequest) -> Reservation:
        if not request.api_key:
            raise MissingKey("this node charges for use: send 'Authorization: Bearer <api key>'")
        try:
            account = await self._run(self.ledger.account_for_key, request.api_key)
            free = self.free_for_operators and await self._run(self.ledger.is_operator, account)
        except UnknownAccount:
            raise InvalidKey("invalid API key") from None
        except LedgerError as exc:
            raise _unavailable(exc) from None
        if free:
            self._pending[request.request_id] = _Pending(request.model, account, True)
            return Reservation(request.request_id, account, 0)
        amount = self.pricing.for_model(request.model).max_cost(
            request.prompt_tokens, request.max_completion_tokens, request.prompt_chars
        )
        if amount == 0:  # a free model: nothing to hold
            self._pending[request.request_id] = _Pending(request.model, account, True)
            return Reservation(request.request_id, account, 0)
        try:
            await self._run(self.ledger.reserve, request.request_id, account, amount)
        except InsufficientBalance as exc:
            raise PaymentRequired(
                f"insufficient balance: this request may cost up to {amount} "
                f"({request.prompt_tokens} prompt tokens and up to {request.max_completion_tokens} "
                f"completion tokens at {request.model!r} prices) and the account has "
                f"{exc.available} available; deposit more or lower max_tokens"
            ) from None
        except LedgerError as exc:
            raise _unavailable(exc) from None
        self._pending[request.request_id] = _Pending(
            request.model, account, False, request.prompt_chars
        )
        return Reservation(request.request_id, account, amount)

    async def settle(
        self,
        reservation: Reservation,
        prompt_tokens: int,
        completion_tokens: int,
        served_by: Sequence[str],
        *,
        completion_chars: int | None = None,
    ) -> Settlement:
        pending = self._pending.pop(reservation.request_id, None)
        if pending is None or pending.free or reservation.account is None:
            balance = None
            if reservation.account is not None:
                balance = await self._balance(reservation.account)
            return Settlement(reservation.request_id, prompt_tokens, completion_tokens, 0, balance)
        usage = Usage(prompt_tokens, completion_tokens, pending.prompt_chars, completion_chars)
        try:
            cost = min(self.pricing.cost(pending.model, usage), reservation.reserved)
        except PricingError as exc:  # e.g. per-character pricing without character counts
            self._pending[reservation.request_id] = pending
            await self.release(reservation)  # the caller is not charged for our failure
            raise PricingFailed(f"cannot price this request: {exc}") from None
        tokens = prompt_tokens + completion_tokens
        admitted = await self._admitted_nodes(refresh=False)
        if (
            not admitted.issuperset(served_by)
            and time.monotonic() - self._admitted_at > UNKNOWN_NODE_REFRESH_S
        ):
            admitted = await self._admitted_nodes(refresh=True)  # perhaps admitted just now
        served = served_map([n for n in served_by if n in admitted], tokens)
        try:
            try:
                await self._run(self.ledger.settle, reservation.request_id, cost, served)
            except UnknownNode:
                # Our list of admitted nodes was stale: refresh it and try once more.
                admitted = await self._admitted_nodes(refresh=True)
                served = served_map([n for n in served_by if n in admitted], tokens)
                await self._run(self.ledger.settle, reservation.request_id, cost, served)
        except LedgerError as exc:
            log.error("settling request %s failed: %s", reservation.request_id, exc)
            raise _unavailable(exc) from None
        balance = await self._balance(pending.account)
        return Settlement(reservation.request_id, prompt_tokens, completion_tokens, cost, balance)

    async def release(self, reservation: Reservation) -> None:
        pending = self._pending.pop(reservation.request_id, None)
        if pending is None or pending.free:
            return
        try:
            await self._run(self.ledger.release, reservation.request_id)
        except LedgerError as exc:
            # Runs in cleanup paths: raising would hide the request's own error.
            # The reservation stays open until recovery releases it.
            log.error("releasing request %s failed: %s", reservation.request_id, exc)

    # -- helpers ---------------------------------------------------------------------

    async def _balance(self, account: str) -> int | None:
        try:
            return (await self._run(self.ledger.balance, account)).available
        except LedgerError:
            return None

    async def _admitted_nodes(self, refresh: bool) -> frozenset[str]:
        if refresh or time.monotonic() - self._admitted_at > NODES_TTL_S:
            nodes = await self._run(self.ledger.nodes)
            self._admitted = frozenset(n.node_id for n in nodes if n.admitted)
            self._admitted_at = time.monotonic()
        return self._admitted


def _unavailable(exc: LedgerError) -> LedgerError:
    """A store or chain failure becomes ``LedgerUnavailable``; other errors stay as they are."""
    if isinstance(exc, BackendError):
        return LedgerUnavailable("the ledger is unavailable; try again")
    return exc


def billing_from_url(
    url: str | None = None,
    pricing: Pricing | str | Path | None = None,
    *,
    actor: str | None = None,
    recover: bool = True,
    free_for_operators: bool = True,
) -> LedgerBilling:
    """Open the ledger at ``url`` (see ``teeshard.ledger.factory``) as entry ``actor``."""
    from teeshard.ledger.factory import open_ledger

    if isinstance(pricing, str | Path):
        pricing = Pricing.load(pricing)
    billing = LedgerBilling(
        open_ledger(url, actor=actor), pricing, free_for_operators=free_for_operators
    )
    if recover:
        billing.recover()
    return billing
