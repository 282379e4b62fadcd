"""The SQL ledger's charges: reserve, settle, release, recovery by lease, stuck reservations.

Functions take an open write transaction and the acting entry node; ``SqlLedger``
calls them. What each one refuses:

- ``reserve``: a caller that is not an authorised entry node; a charge without
  the user's authorisation (the hash of one of the account's API keys); more
  than the entry node's spend limit for its period; more than the balance.
  A reservation records the most tokens it may credit (prompt + max tokens),
  the entry process's lease, and the client's idempotency key;
- ``settle``: tokens above that bound; nodes not admitted (or whose admission
  expired); receipts that do not verify. Only nodes whose receipts prove the work are
  credited, with the cost paid, by layers times the token positions each
  segment of the answer added (``teeshard.ledger.work``);
- ``recover``: releases reservations whose lease expired only (another replica
  of the same entry keeps its live ones).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import Connection, insert, select, update

from teeshard.attest.receipts import Receipt
from teeshard.ledger.interface import (
    DuplicateRequest,
    InsufficientBalance,
    InvalidAmount,
    ReservationClosed,
    ReservationRecord,
    ReservationState,
    SpendLimitExceeded,
    Unauthorized,
    UnknownRequest,
    check_amount,
    check_request_id,
    check_tokens,
)
from teeshard.ledger.sql import pool as pool_ops
from teeshard.ledger.sql.rows import apply, lock_account, now, reservation_record
from teeshard.ledger.sql.schema import POOL, api_keys, entries, leases, reservations
from teeshard.ledger.work import credits_for

RESERVED = ReservationState.RESERVED.value


def require_entry(conn: Connection, actor: str, what: str) -> Any:
    row = conn.execute(select(entries).where(entries.c.name == actor)).one_or_none()
    if row is None:
        raise Unauthorized(
            f"{actor!r} is not an authorised entry node and may not {what}; "
            "the ledger owner authorises entry nodes (teeshard ledger authorize-entry)"
        )
    return row


def renew_lease(conn: Connection, actor: str, lease_id: str, ttl_s: float) -> None:
    at = now()
    found = conn.execute(select(leases.c.holder).where(leases.c.lease_id == lease_id)).first()
    if found is None:
        conn.execute(
            insert(leases).values(
                lease_id=lease_id, holder=actor, expires_at=at + ttl_s, created_at=at
            )
        )
    else:
        conn.execute(
            update(leases).where(leases.c.lease_id == lease_id).values(expires_at=at + ttl_s)
        )


def _check_authorisation(conn: Connection, account: str, key_hash: str | None) -> None:
    if not key_hash:
        raise Unauthorized(
            "a charge must carry the user's authorisation: the hash of one of the "
            f"account's API keys (none was given for {account!r})"
        )
    owner = conn.execute(
        select(api_keys.c.account_id).where(api_keys.c.key_hash == key_hash)
    ).scalar_one_or_none()
    if owner != account:
        raise Unauthorized(f"the API key given does not belong to account {account!r}")


def _spent(conn: Connection, actor: str, since: float) -> int:
    """What an entry node holds or charged in reservations made since ``since``."""
    total = 0
    for state, amount, cost in conn.execute(
        select(reservations.c.state, reservations.c.amount, reservations.c.cost).where(
            (reservations.c.holder == actor) & (reservations.c.created_at >= since)
        )
    ):
        total += amount if state == RESERVED else cost
    return total


def reserve(
    conn: Connection,
    actor: str,
    lease: tuple[str, float],
    request_id: str,
    account: str,
    amount: int,
    *,
    key_hash: str | None,
    max_tokens: int | None,
    idempotency_key: str | None,
) -> ReservationRecord:
    check_request_id(request_id)
    check_amount(amount, "reservation")
    if max_tokens is not None:
        check_amount(max_tokens, "max_tokens")
    entry = require_entry(conn, actor, "reserve charges")
    row = lock_account(conn, account)
    _check_authorisation(conn, account, key_hash)
    if idempotency_key is not None:
        previous = _by_idempotency_key(conn, account, idempotency_key)
        if previous is not None:
            return previous
    existing = conn.execute(
        select(reservations).where(reservations.c.request_id == request_id)
    ).one_or_none()
    if existing is not None:
        return replayed(reservation_record(existing), actor, account, amount)
    if entry.spend_limit is not None:
        spent = _spent(conn, actor, now() - entry.period_s)
        if spent + amount > entry.spend_limit:
            raise SpendLimitExceeded(
                f"entry node {actor!r} has spent {spent} of its limit {entry.spend_limit} "
                f"per {entry.period_s:g} s; this request may cost up to {amount}"
            )
    if row.available < amount:
        raise InsufficientBalance(
            f"account {account!r} has {row.available} available; "
            f"this request may cost up to {amount}",
            available=row.available,
            needed=amount,
        )
    lease_id, ttl_s = lease
    renew_lease(conn, actor, lease_id, ttl_s)
    apply(conn, "reserve", account, available=-amount, reserved=amount, request_id=request_id)
    created = now()
    conn.execute(
        insert(reservations).values(
            request_id=request_id,
            account_id=account,
            amount=amount,
            holder=actor,
            incarnation=lease_id,
            state=RESERVED,
            cost=0,
            created_at=created,
            key_hash=key_hash,
            max_tokens=max_tokens,
            idempotency_key=idempotency_key,
        )
    )
    return ReservationRecord(
        request_id, account, amount, actor, ReservationState.RESERVED, 0, created, idempotency_key
    )


def _by_idempotency_key(conn: Connection, account: str, key: str) -> ReservationRecord | None:
    """The charge an earlier try of this request made; a released one frees the key."""
    if not key or len(key) > 128:
        raise InvalidAmount(f"an idempotency key is 1-128 characters, got {len(key)}")
    row = conn.execute(
        select(reservations).where(
            (reservations.c.account_id == account) & (reservations.c.idempotency_key == key)
        )
    ).one_or_none()
    if row is None:
        return None
    if row.state == ReservationState.RELEASED.value:  # that try was not charged: try again
        conn.execute(
            update(reservations)
            .where(reservations.c.request_id == row.request_id)
            .values(idempotency_key=None)
        )
        return None
    return reservation_record(row)


def replayed(record: ReservationRecord, actor: str, account: str, amount: int) -> ReservationRecord:
    """A replayed reserve returns the open reservation it names, or says why it cannot."""
    same = (record.account, record.amount, record.holder) == (account, amount, actor)
    if same and record.state is ReservationState.RESERVED:
        return record
    raise DuplicateRequest(
        f"request id {record.request_id!r} was already used: {record.state.value}, "
        f"account {record.account!r}, amount {record.amount}, by {record.holder!r}"
    )


def open_reservation(conn: Connection, actor: str, request_id: str) -> Any:
    """The reservation's row, locked, after its account (the lock order); must be ours."""
    row = conn.execute(
        select(reservations).where(reservations.c.request_id == request_id)
    ).one_or_none()
    if row is None:
        raise UnknownRequest(f"no reservation for request {request_id!r}")
    if row.holder != actor:
        raise Unauthorized(
            f"reservation {request_id!r} belongs to entry {row.holder!r}, not {actor!r}"
        )
    lock_account(conn, row.account_id)
    return conn.execute(
        select(reservations).where(reservations.c.request_id == request_id).with_for_update()
    ).one()


def settle(
    conn: Connection,
    actor: str,
    request_id: str,
    cost: int,
    served: Mapping[str, int],
    receipts: Sequence[Receipt],
) -> ReservationRecord:
    if isinstance(cost, bool) or not isinstance(cost, int) or cost < 0:
        raise InvalidAmount(f"cost must be a non-negative integer, got {cost!r}")
    check_tokens(served)
    require_entry(conn, actor, "settle charges")
    pool_ops.lock_pool(conn)  # first in the lock order: pool, accounts, reservation
    row = open_reservation(conn, actor, request_id)
    record = reservation_record(row)
    if record.state is ReservationState.SETTLED:
        if record.cost == cost:
            return record  # a replayed settle: nothing more is charged or credited
        raise DuplicateRequest(
            f"request {request_id!r} was already settled at cost {record.cost}, not {cost}"
        )
    if record.state is ReservationState.RELEASED:
        raise ReservationClosed(
            f"reservation {request_id!r} was released (failed request, restart or "
            "timeout) and cannot be settled"
        )
    if cost > record.amount:
        raise InvalidAmount(f"cost {cost} exceeds the {record.amount} reserved")
    served = check_tokens(served, row.max_tokens)
    signers = pool_ops.attested_signers(conn, served)
    credits = credits_for(request_id, cost, served, receipts, signers)
    apply(
        conn,
        "settle",
        record.account,
        available=record.amount - cost,
        reserved=-record.amount,
        request_id=request_id,
        memo=f"cost {cost}",
    )
    if cost:
        apply(conn, "settle", POOL, pool=cost, request_id=request_id)
    pool_ops.record_work(conn, request_id, served, credits)
    conn.execute(
        update(reservations)
        .where(reservations.c.request_id == request_id)
        .values(state=ReservationState.SETTLED.value, cost=cost, closed_at=now())
    )
    return ReservationRecord(
        request_id, record.account, record.amount, record.holder,
        ReservationState.SETTLED, cost, record.created_at, record.idempotency_key,
    )  # fmt: skip


def release_row(conn: Connection, row: Any, kind: str) -> ReservationRecord:
    record = reservation_record(row)
    if record.state is ReservationState.RELEASED:
        return record  # a replayed release is a no-op
    if record.state is ReservationState.SETTLED:
        raise ReservationClosed(
            f"reservation {record.request_id!r} was settled at cost {record.cost}; "
            "it cannot be released"
        )
    apply(
        conn,
        kind,
        record.account,
        available=record.amount,
        reserved=-record.amount,
        request_id=record.request_id,
    )
    conn.execute(
        update(reservations)
        .where(reservations.c.request_id == record.request_id)
        .values(state=ReservationState.RELEASED.value, closed_at=now())
    )
    return ReservationRecord(
        record.request_id, record.account, record.amount, record.holder,
        ReservationState.RELEASED, 0, record.created_at, record.idempotency_key,
    )  # fmt: skip


def expired_reservations(
    conn: Connection, holder: str | None, older_than_s: float | None
) -> list[tuple[str, str]]:
    """(request id, account) of open reservations whose lease expired (or never existed)."""
    at = now()
    live = {
        lease_id
        for (lease_id,) in conn.execute(select(leases.c.lease_id).where(leases.c.expires_at >= at))
    }
    query = select(
        reservations.c.request_id,
        reservations.c.account_id,
        reservations.c.incarnation,
        reservations.c.created_at,
    ).where(reservations.c.state == RESERVED)
    if holder is not None:
        query = query.where(reservations.c.holder == holder)
    found = []
    for request_id, account, lease_id, created_at in conn.execute(query):
        if lease_id in live:
            continue
        if older_than_s is not None and created_at > at - older_than_s:
            continue
        found.append((request_id, account))
    return found


def recover_one(conn: Connection, request_id: str, account: str) -> bool:
    lock_account(conn, account)
    row = conn.execute(
        select(reservations).where(reservations.c.request_id == request_id).with_for_update()
    ).one()
    live = conn.execute(
        select(leases.c.lease_id).where(
            (leases.c.lease_id == row.incarnation) & (leases.c.expires_at >= now())
        )
    ).first()
    if row.state != RESERVED or live is not None:
        return False  # settled meanwhile, or its process came back
    release_row(conn, row, "recover")
    return True


def open_reservations(conn: Connection, older_than_s: float) -> list[ReservationRecord]:
    rows = conn.execute(
        select(reservations)
        .where(
            (reservations.c.state == RESERVED) & (reservations.c.created_at <= now() - older_than_s)
        )
        .order_by(reservations.c.created_at)
    )
    return [reservation_record(row) for row in rows]
