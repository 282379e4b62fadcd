"""Row-level helpers of the SQL ledger: locks, journaled balance changes, conversions.

Every balance change goes through ``apply``: it updates the cached balance and
appends the journal row in the caller's transaction, so neither can exist
without the other.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from sqlalchemy import Connection, Row, insert, select, update

from teeshard.ledger.interface import (
    JournalEntry,
    NodeRecord,
    ReservationRecord,
    ReservationState,
    UnknownAccount,
)
from teeshard.ledger.sql.schema import POOL, accounts, journal, meta, nodes, work


def now() -> float:
    return time.time()


def lock_account(conn: Connection, account: str) -> Row[Any]:
    """The account's row, locked until the transaction ends (FOR UPDATE; SQLite: the file lock)."""
    row = conn.execute(
        select(accounts).where(accounts.c.id == account).with_for_update()
    ).one_or_none()
    if row is None:
        raise UnknownAccount(f"no account {account!r}")
    return row


def lock_accounts(conn: Connection, ids: Iterable[str]) -> dict[str, Row[Any]]:
    """Lock several accounts in id order, the one order every writer uses."""
    return {account: lock_account(conn, account) for account in sorted(set(ids))}


def get_meta(conn: Connection, key: str) -> str | None:
    return conn.execute(select(meta.c.value).where(meta.c.key == key)).scalar_one_or_none()


def set_meta(conn: Connection, key: str, value: str) -> None:
    if get_meta(conn, key) is None:
        conn.execute(insert(meta).values(key=key, value=value))
    else:
        conn.execute(update(meta).where(meta.c.key == key).values(value=value))


def apply(
    conn: Connection,
    kind: str,
    account: str,
    *,
    available: int = 0,
    reserved: int = 0,
    earnings: int = 0,
    pool: int = 0,
    request_id: str | None = None,
    memo: str | None = None,
) -> JournalEntry:
    """Change one account's balances (or the pool) and journal it; the caller holds the lock."""
    at = now()
    if account == POOL:
        values = {"available": accounts.c.available + pool}
    else:
        values = {
            "available": accounts.c.available + available,
            "reserved": accounts.c.reserved + reserved,
            "earnings": accounts.c.earnings + earnings,
        }
    conn.execute(update(accounts).where(accounts.c.id == account).values(**values))
    seq = conn.execute(
        insert(journal)
        .values(
            at=at,
            kind=kind,
            account_id=account,
            available=available,
            reserved=reserved,
            earnings=earnings,
            pool=pool,
            request_id=request_id,
            memo=memo,
        )
        .returning(journal.c.seq)
    ).scalar_one()
    return JournalEntry(
        seq, at, kind, account, available, reserved, earnings, pool, request_id, memo
    )


def journal_entry(row: Row[Any]) -> JournalEntry:
    return JournalEntry(
        seq=row.seq,
        at=row.at,
        kind=row.kind,
        account=row.account_id,
        available=row.available,
        reserved=row.reserved,
        earnings=row.earnings,
        pool=row.pool,
        request_id=row.request_id,
        memo=row.memo,
    )


def reservation_record(row: Row[Any]) -> ReservationRecord:
    return ReservationRecord(
        request_id=row.request_id,
        account=row.account_id,
        amount=row.amount,
        holder=row.holder,
        state=ReservationState(row.state),
        cost=row.cost,
        created_at=row.created_at,
        idempotency_key=row.idempotency_key,
    )


def epoch(conn: Connection) -> int:
    return int(get_meta(conn, "epoch") or 0)


def node_records(conn: Connection, node_id: str | None = None) -> list[NodeRecord]:
    """Registered nodes; ``admitted`` only while the admission has not expired."""
    current = epoch(conn)
    pending: dict[str, tuple[int, int]] = {}
    query_work = select(work.c.node_id, work.c.tokens, work.c.credit).where(work.c.epoch == current)
    if node_id is not None:
        query_work = query_work.where(work.c.node_id == node_id)
    for name, tokens, credit in conn.execute(query_work):  # summed here: arbitrary precision
        t, c = pending.get(name, (0, 0))
        pending[name] = (t + tokens, c + credit)
    query = select(nodes).where(nodes.c.removed.is_(False)).order_by(nodes.c.node_id)
    if node_id is not None:
        query = query.where(nodes.c.node_id == node_id)
    at = now()
    records = []
    for row in conn.execute(query):
        tokens, credit = pending.get(row.node_id, (0, 0))
        admitted = bool(row.admitted) and row.admitted_until > at
        records.append(
            NodeRecord(
                node_id=row.node_id,
                operator=row.operator,
                url=row.url,
                manifest_hash=row.manifest_hash,
                model=row.model,
                layers=row.layers,
                admitted=admitted,
                served_tokens=tokens,
                served_total=int(row.served_total),
                earned=credit,
                admitted_until=float(row.admitted_until) if admitted else 0.0,
            )
        )
    return records
