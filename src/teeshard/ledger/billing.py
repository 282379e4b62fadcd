"""Charging requests through any ``Ledger``: reserve, settle, release.

Plug-in (the entry node wraps it in ``teeshard.entry.billing.BillingAPI``, which
turns the errors below into HTTP statuses)::

    billing = billing_from_url("sqlite:///ledger.db", pricing="pricing.toml", actor="entry-1")

Behaviour:
- no API key: ``MissingKey``; a key no account has: ``InvalidKey``; not enough
  balance for the most the request can cost: ``PaymentRequired`` with both numbers;
- operators of admitted nodes use the model free (cost 0 in the usage);
- per-token or per-character pricing (the entry passes character counts);
- reserve passes the ledger the user's authorisation (the hash of the API key),
  the most tokens the request may credit (prompt + max tokens) and the client's
  ``Idempotency-Key``: a retry of a request already charged (or in flight) is
  refused with ``IdempotentReplay`` (409), never charged again;
- settle charges the priced usage (never above what was reserved), releases
  the rest, and passes the admitted nodes of the serving chain with the
  request's receipts: the ledger credits each node whose receipt verifies with
  its share of the cost, by layers; free requests credit no work;
- settle and release go through a durable outbox (``teeshard.ledger.outbox``):
  a transient ledger failure is retried with the same request id by the
  maintenance thread, which also renews this process's lease (heartbeat) and
  releases reservations of this entry's expired leases (``recover``).

Ledger calls block, so they run on a thread pool; the event loop never waits on
the database or the chain. Nothing here logs an API key, a prompt or a completion.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from teeshard.attest.receipts import Receipt
from teeshard.ledger.interface import (
    BackendError,
    InsufficientBalance,
    Ledger,
    LedgerError,
    ReservationState,
    SpendLimitExceeded,
    UnknownAccount,
    UnknownNode,
    served_map,
)
from teeshard.ledger.keys import hash_api_key
from teeshard.ledger.outbox import Outbox, OutboxItem
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
    idempotency_key: str | None = None  # the client's Idempotency-Key header, if it sent one


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
    ├── PricingFailed      the request cannot be priced (a configuration error)
    └── IdempotentReplay   a request with this Idempotency-Key was charged (or is running)
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


class IdempotentReplay(BillingError):
    """A retry of a request already charged (``state`` settled) or still running (reserved).

    The entry answers 409 (or the stored response of ``request_id``); never a second charge.
    """

    code = "idempotent_replay"

    def __init__(self, message: str, request_id: str, state: str) -> None:
        super().__init__(message)
        self.request_id = request_id
        self.state = state


MAINTENANCE_S = 5.0  # outbox retries, lease heartbeat and recovery, this often


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
        outbox: Outbox | None = None,
        maintenance_s: float | None = None,  # billing_from_url: MAINTENANCE_S
    ) -> None:
        self.ledger = ledger
        self.pricing = pricing or Pricing()
        self.free_for_operators = free_for_operators
        self.outbox = outbox or Outbox()
        self._executor = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="ledger")
        self._pending: dict[str, _Pending] = {}
        self._admitted: frozenset[str] = frozenset()
        self._admitted_at = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if maintenance_s is not None:
            self._thread = threading.Thread(
                target=self._maintain, args=(maintenance_s,), name="ledger-maintenance", daemon=True
            )
            self._thread.start()

    async def _run(self, fn: Callable[..., T], *args: object) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def recover(self, older_than_s: float | None = None) -> list[str]:
        """Release what processes of this entry whose lease expired left reserved."""
        released = self.ledger.recover(older_than_s)
        if released:
            log.warning("released %d reservations of expired leases", len(released))
        return released

    def flush(self) -> int:
        """Retry every settle and release in the outbox; how many are still pending."""
        left = 0
        for item in self.outbox.pending():
            try:
                self._apply(item)
            except BackendError as exc:
                self.outbox.failed(item.request_id)
                log.warning("%s of request %s still fails: %s", item.kind, item.request_id, exc)
                left += 1
            except LedgerError as exc:  # not transient: retrying cannot help
                log.error("%s of request %s dropped: %s", item.kind, item.request_id, exc)
                self.outbox.done(item.request_id)
        return left

    def maintain(self) -> None:
        """One round of upkeep: heartbeat, outbox, recovery of expired leases."""
        try:
            self.ledger.heartbeat()
            self.flush()
            self.recover()
        except LedgerError as exc:
            log.warning("ledger upkeep failed: %s", exc)

    def _maintain(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            self.maintain()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._executor.shutdown(wait=True)
        self.flush()
        self.outbox.close()
        self.ledger.close()

    def _apply(self, item: OutboxItem) -> None:
        """One outbox item against the ledger; it leaves the outbox once the ledger has it."""
        if item.kind == "settle":
            self.ledger.settle(item.request_id, item.cost, item.served, receipts=item.receipts)
        else:
            self.ledger.release(item.request_id)
        self.outbox.done(item.request_id)

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
            record = await self._run(
                lambda: self.ledger.reserve(
                    request.request_id,
                    account,
                    amount,
                    key_hash=hash_api_key(request.api_key or ""),
                    max_tokens=request.prompt_tokens + request.max_completion_tokens,
                    idempotency_key=request.idempotency_key,
                )
            )
        except InsufficientBalance as exc:
            raise PaymentRequired(
                f"insufficient balance: this request may cost up to {amount} "
                f"({request.prompt_tokens} prompt tokens and up to {request.max_completion_tokens} "
                f"completion tokens at {request.model!r} prices) and the account has "
                f"{exc.available} available; deposit more or lower max_tokens"
            ) from None
        except LedgerError as exc:
            raise _unavailable(exc) from None
        if record.request_id != request.request_id:
            running = record.state is ReservationState.RESERVED
            raise IdempotentReplay(
                f"a request with this Idempotency-Key was already "
                f"{'received and is still running' if running else 'charged'} "
                f"(request {record.request_id}); it is not charged again",
                record.request_id,
                record.state.value,
            )
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
        receipts: Sequence[Receipt] = (),
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
        item = OutboxItem(
            "settle",
            reservation.request_id,
            cost,
            served_map([n for n in served_by if n in admitted], tokens),
            tuple(receipts),
        )
        try:
            try:
                await self._run(self._send, item)
            except UnknownNode:
                # Our list of admitted nodes was stale (or an admission expired): look again.
                admitted = await self._admitted_nodes(refresh=True)
                served = served_map([n for n in served_by if n in admitted], tokens)
                await self._run(self._send, OutboxItem("settle", item.request_id, cost, served,
                                                       item.receipts))  # fmt: skip
        except BackendError as exc:
            # The outbox holds it: the maintenance thread settles it when the ledger is back.
            log.warning("settling request %s is queued for retry: %s", item.request_id, exc)
            return Settlement(reservation.request_id, prompt_tokens, completion_tokens, cost)
        except LedgerError as exc:
            self.outbox.done(item.request_id)
            log.error("settling request %s failed: %s", reservation.request_id, exc)
            raise _unavailable(exc) from None
        balance = await self._balance(pending.account)
        return Settlement(reservation.request_id, prompt_tokens, completion_tokens, cost, balance)

    async def release(self, reservation: Reservation) -> None:
        pending = self._pending.pop(reservation.request_id, None)
        if pending is None or pending.free:
            return
        try:
            await self._run(self._send, OutboxItem("release", reservation.request_id))
        except BackendError as exc:
            log.warning("releasing request %s is queued for retry: %s", reservation.request_id, exc)
        except LedgerError as exc:
            # Runs in cleanup paths: raising would hide the request's own error.
            self.outbox.done(reservation.request_id)
            log.error("releasing request %s failed: %s", reservation.request_id, exc)

    def _send(self, item: OutboxItem) -> None:
        """Write ``item`` to the outbox, then apply it (it stays there if the ledger fails)."""
        self.outbox.put(item)
        self._apply(item)

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
    if isinstance(exc, SpendLimitExceeded):  # this entry's limit, not the caller's fault
        return LedgerUnavailable(
            "this entry node has reached its spend limit for now; try again later"
        )
    return exc


def billing_from_url(
    url: str | None = None,
    pricing: Pricing | str | Path | None = None,
    *,
    actor: str | None = None,
    recover: bool = True,
    free_for_operators: bool = True,
    outbox: str | Path | None = None,
) -> LedgerBilling:
    """Open the ledger at ``url`` (see ``teeshard.ledger.factory``) as entry ``actor``.

    ``outbox``: the durable outbox's file (default: ``outbox-ACTOR.sqlite`` in the
    ledger's home, ``$TEESHARD_HOME`` or ``~/.teeshard``). What an earlier process
    left there is sent first, then expired leases are recovered.
    """
    from teeshard.ledger.factory import ledger_home, open_ledger

    if isinstance(pricing, str | Path):
        pricing = Pricing.load(pricing)
    ledger = open_ledger(url, actor=actor)
    if outbox is None:
        name = "".join(c if c.isalnum() or c in "-_." else "_" for c in ledger.actor)
        outbox = ledger_home() / f"outbox-{name}.sqlite"
    billing = LedgerBilling(
        ledger,
        pricing,
        free_for_operators=free_for_operators,
        outbox=Outbox(outbox),
        maintenance_s=MAINTENANCE_S,
    )
    billing.flush()
    if recover:
        billing.recover()
    return billing
