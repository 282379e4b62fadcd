"""The SQL ledger: accounts, API keys and charges (reserve / settle / release / recover).

Pool operations (nodes, distribution, withdrawal) and the consistency check live
in ``teeshard.ledger.sql.pool``; this class delegates to them.

Identity: an ``SqlLedger`` acts as ``actor``, a name. Whoever can write to the
database can claim any name, so the role checks here keep honest callers
(entry nodes, the CLI) within their roles; they are not a defence against
someone holding the database itself. The first ``open`` of an empty database
makes its actor (or ``owner``) the owner, as deploying a contract does.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator, Mapping
from typing import Any

from sqlalchemy import Connection, insert, or_, select, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from teeshard.ledger.interface import (
    BackendError,
    Balance,
    Consistency,
    Distribution,
    DuplicateKey,
    DuplicateRequest,
    InsufficientBalance,
    InvalidAmount,
    JournalEntry,
    LedgerError,
    NodeInfo,
    NodeRecord,
    ReservationClosed,
    ReservationRecord,
    ReservationState,
    Unauthorized,
    UnknownAccount,
    UnknownRequest,
    check_amount,
    check_request_id,
    check_tokens,
)
from teeshard.ledger.keys import hash_api_key
from teeshard.ledger.sql import pool as pool_ops
from teeshard.ledger.sql.engine import Engines, make_engines, migrate
from teeshard.ledger.sql.rows import (
    apply,
    get_meta,
    journal_entry,
    lock_account,
    now,
    reservation_record,
    set_meta,
)
from teeshard.ledger.sql.schema import POOL, accounts, api_keys, entries, journal, reservations


class SqlLedger:
    def __init__(self, engines: Engines, actor: str, incarnation: str | None = None) -> None:
        if not actor:
            raise ValueError("a ledger actor name is required")
        self.engines = engines
        self._actor = actor
        # Reservations made through this object carry its incarnation; recover()
        # releases this actor's reservations from any other (an earlier process).
        self.incarnation = incarnation or uuid.uuid4().hex

    @classmethod
    def open(
        cls, url: str, actor: str, *, owner: str | None = None, run_migrations: bool = True
    ) -> SqlLedger:
        engines = make_engines(url)
        if run_migrations:
            migrate(engines)
        ledger = cls(engines, actor)
        try:
            with ledger._write() as conn:
                if get_meta(conn, "owner") is None:
                    set_meta(conn, "owner", owner or actor)
                    set_meta(conn, "epoch", "0")
                    conn.execute(
                        insert(accounts).values(
                            id=POOL, available=0, reserved=0, earnings=0, created_at=now()
                        )
                    )
        except BackendError as exc:
            # Another process initialised the same empty database first: theirs stands.
            if not isinstance(exc.__cause__, IntegrityError):
                raise
        return ledger

    def as_actor(self, actor: str) -> SqlLedger:
        """The same database, acting as someone else (a new incarnation)."""
        return SqlLedger(self.engines, actor)

    @property
    def actor(self) -> str:
        return self._actor

    def close(self) -> None:
        self.engines.dispose()

    # -- transactions and roles ------------------------------------------------------

    @contextlib.contextmanager
    def _write(self) -> Iterator[Connection]:
        try:
            with self.engines.write.begin() as conn:
                yield conn
        except LedgerError:
            raise
        except SQLAlchemyError as exc:
            raise BackendError(f"ledger database error: {exc.__class__.__name__}: {exc}") from exc

    @contextlib.contextmanager
    def _read(self) -> Iterator[Connection]:
        try:
            with self.engines.read.connect() as conn:
                yield conn
        except SQLAlchemyError as exc:
            raise BackendError(f"ledger database error: {exc.__class__.__name__}: {exc}") from exc

    def owner(self) -> str:
        with self._read() as conn:
            return get_meta(conn, "owner") or ""

    def _require_owner(self, conn: Connection, what: str) -> None:
        owner = get_meta(conn, "owner")
        if self._actor != owner:
            raise Unauthorized(
                f"only the ledger owner ({owner!r}) may {what}; you are {self._actor!r}"
            )

    def _is_entry(self, conn: Connection) -> bool:
        found = conn.execute(select(entries.c.name).where(entries.c.name == self._actor))
        return found.first() is not None

    def _require_entry(self, conn: Connection, what: str) -> None:
        if not self._is_entry(conn):
            raise Unauthorized(
                f"{self._actor!r} is not an authorised entry node and may not {what}; "
                "the ledger owner authorises entry nodes (teeshard ledger authorize-entry)"
            )

    # -- accounts --------------------------------------------------------------------

    def open_account(self, account: str) -> None:
        if not account or len(account) > 128 or account.startswith("@"):
            raise LedgerError(
                f"account names are 1-128 characters, not starting with '@': {account!r}"
            )
        with self._write() as conn:
            self._require_owner(conn, "open accounts")
            exists = conn.execute(select(accounts.c.id).where(accounts.c.id == account)).first()
            if exists is None:
                conn.execute(
                    insert(accounts).values(
                        id=account, available=0, reserved=0, earnings=0, created_at=now()
                    )
                )

    def add_api_key(self, account: str, api_key: str) -> None:
        key_hash = hash_api_key(api_key)
        with self._write() as conn:
            if self._actor != account:
                self._require_owner(conn, f"add API keys to account {account!r}")
            lock_account(conn, account)
            taken = conn.execute(select(api_keys).where(api_keys.c.key_hash == key_hash)).first()
            if taken is not None:
                raise DuplicateKey("this API key is already bound to an account")
            conn.execute(
                insert(api_keys).values(key_hash=key_hash, account_id=account, created_at=now())
            )

    def account_for_key(self, api_key: str) -> str:
        key_hash = hash_api_key(api_key)
        with self._read() as conn:
            account = conn.execute(
                select(api_keys.c.account_id).where(api_keys.c.key_hash == key_hash)
            ).scalar_one_or_none()
        if account is None:
            raise UnknownAccount("no account has this API key")
        return str(account)

    def deposit(self, account: str, amount: int) -> JournalEntry:
        check_amount(amount, "deposit")
        with self._write() as conn:
            # SQL deposits record a payment received elsewhere, so only the owner mints.
            self._require_owner(conn, "record deposits")
            lock_account(conn, account)
            return apply(conn, "deposit", account, available=amount)

    def balance(self, account: str) -> Balance:
        with self._read() as conn:
            row = conn.execute(select(accounts).where(accounts.c.id == account)).one_or_none()
        if row is None or account == POOL:
            raise UnknownAccount(f"no account {account!r}")
        return Balance(account, row.available, row.reserved, row.earnings)

    def history(self, account: str, limit: int = 100) -> list[JournalEntry]:
        self.balance(account)  # UnknownAccount for a name that does not exist
        with self._read() as conn:
            rows = conn.execute(
                select(journal)
                .where(journal.c.account_id == account)
                .order_by(journal.c.seq.desc())
                .limit(limit)
            )
            return [journal_entry(row) for row in rows]

    # -- charges ---------------------------------------------------------------------

    def authorize_entry(self, entry: str) -> None:
        with self._write() as conn:
            self._require_owner(conn, "authorise entry nodes")
            if conn.execute(select(entries).where(entries.c.name == entry)).first() is None:
                conn.execute(insert(entries).values(name=entry, created_at=now()))

    def reservation(self, request_id: str) -> ReservationRecord:
        with self._read() as conn:
            row = conn.execute(
                select(reservations).where(reservations.c.request_id == request_id)
            ).one_or_none()
        if row is None:
            raise UnknownRequest(f"no reservation for request {request_id!r}")
        return reservation_record(row)

    def reserve(self, request_id: str, account: str, amount: int) -> ReservationRecord:
        check_request_id(request_id)
        check_amount(amount, "reservation")
        try:
            with self._write() as conn:
                self._require_entry(conn, "reserve charges")
                existing = conn.execute(
                    select(reservations).where(reservations.c.request_id == request_id)
                ).one_or_none()
                if existing is not None:
                    return self._replayed(reservation_record(existing), account, amount)
                row = lock_account(conn, account)
                if row.available < amount:
                    raise InsufficientBalance(
                        f"account {account!r} has {row.available} available; "
                        f"this request may cost up to {amount}",
                        available=row.available,
                        needed=amount,
                    )
                apply(
                    conn,
                    "reserve",
                    account,
                    available=-amount,
                    reserved=amount,
                    request_id=request_id,
                )
                created = now()
                conn.execute(
                    insert(reservations).values(
                        request_id=request_id,
                        account_id=account,
                        amount=amount,
                        holder=self._actor,
                        incarnation=self.incarnation,
                        state=ReservationState.RESERVED.value,
                        cost=0,
                        created_at=created,
                    )
                )
                return ReservationRecord(
                    request_id, account, amount, self._actor, ReservationState.RESERVED, 0, created
                )
        except BackendError as exc:
            # Two replays raced past the check: the loser sees the winner's row.
            if isinstance(exc.__cause__, IntegrityError):
                return self._replayed(self.reservation(request_id), account, amount)
            raise

    def _replayed(self, record: ReservationRecord, account: str, amount: int) -> ReservationRecord:
        """A replayed reserve returns the open reservation it names, or says why it cannot."""
        same = (record.account, record.amount, record.holder) == (account, amount, self._actor)
        if same and record.state is ReservationState.RESERVED:
            return record
        raise DuplicateRequest(
            f"request id {record.request_id!r} was already used: {record.state.value}, "
            f"account {record.account!r}, amount {record.amount}, by {record.holder!r}"
        )

    def _open_reservation(self, conn: Connection, request_id: str) -> Any:
        """The reservation's row, locked, after its account (the lock order); must be ours."""
        row = conn.execute(
            select(reservations).where(reservations.c.request_id == request_id)
        ).one_or_none()
        if row is None:
            raise UnknownRequest(f"no reservation for request {request_id!r}")
        if row.holder != self._actor:
            raise Unauthorized(
                f"reservation {request_id!r} belongs to entry {row.holder!r}, not {self._actor!r}"
            )
        lock_account(conn, row.account_id)
        return conn.execute(
            select(reservations).where(reservations.c.request_id == request_id).with_for_update()
        ).one()

    def settle(self, request_id: str, cost: int, served: Mapping[str, int]) -> ReservationRecord:
        if isinstance(cost, bool) or not isinstance(cost, int) or cost < 0:
            raise InvalidAmount(f"cost must be a non-negative integer, got {cost!r}")
        served = check_tokens(served)
        with self._write() as conn:
            self._require_entry(conn, "settle charges")
            pool_ops.lock_pool(conn)  # first in the lock order: pool, accounts, reservation
            row = self._open_reservation(conn, request_id)
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
            pool_ops.check_served_nodes(conn, served)
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
            pool_ops.record_work(conn, request_id, served)
            conn.execute(
                update(reservations)
                .where(reservations.c.request_id == request_id)
                .values(state=ReservationState.SETTLED.value, cost=cost, closed_at=now())
            )
            return ReservationRecord(
                request_id,
                record.account,
                record.amount,
                record.holder,
                ReservationState.SETTLED,
                cost,
                record.created_at,
            )

    def release(self, request_id: str) -> ReservationRecord:
        with self._write() as conn:
            self._require_entry(conn, "release charges")
            row = self._open_reservation(conn, request_id)
            return self._release_row(conn, row, "release")

    def _release_row(self, conn: Connection, row: Any, kind: str) -> ReservationRecord:
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
            record.request_id,
            record.account,
            record.amount,
            record.holder,
            ReservationState.RELEASED,
            0,
            record.created_at,
        )

    def recover(self, older_than_s: float | None = None) -> list[str]:
        """Release this entry's reservations left by earlier processes, and any stale ones."""
        with self._read() as conn:
            self._require_entry(conn, "recover reservations")
            stale = reservations.c.holder == self._actor
            stale = stale & (reservations.c.incarnation != self.incarnation)
            if older_than_s is not None:
                stale = or_(stale, reservations.c.created_at < now() - older_than_s)
            candidates = conn.execute(
                select(reservations.c.request_id, reservations.c.account_id).where(
                    (reservations.c.state == ReservationState.RESERVED.value) & stale
                )
            ).all()
        released = []
        for request_id, account in candidates:
            with self._write() as conn:
                self._require_entry(conn, "recover reservations")
                lock_account(conn, account)
                row = conn.execute(
                    select(reservations)
                    .where(reservations.c.request_id == request_id)
                    .with_for_update()
                ).one()
                if row.state == ReservationState.RESERVED.value:
                    self._release_row(conn, row, "recover")
                    released.append(request_id)
        return released

    # -- the pool (see sql.pool) -----------------------------------------------------

    def register_node(self, node: NodeInfo) -> NodeRecord:
        with self._write() as conn:
            return pool_ops.register_node(conn, self._actor, node)

    def admit_node(self, node_id: str, manifest_hash: str) -> NodeRecord:
        with self._write() as conn:
            if get_meta(conn, "owner") != self._actor:
                self._require_entry(conn, "admit nodes")
            return pool_ops.admit_node(conn, node_id, manifest_hash)

    def edit_node(
        self, node_id: str, *, url: str | None = None, manifest_hash: str | None = None
    ) -> NodeRecord:
        with self._write() as conn:
            return pool_ops.edit_node(conn, self._actor, node_id, url, manifest_hash)

    def remove_node(self, node_id: str) -> None:
        with self._write() as conn:
            pool_ops.remove_node(conn, self._actor, node_id)

    def nodes(self) -> list[NodeRecord]:
        with self._read() as conn:
            return pool_ops.list_nodes(conn)

    def is_operator(self, account: str) -> bool:
        with self._read() as conn:
            return pool_ops.is_operator(conn, account)

    def pool(self) -> int:
        with self._read() as conn:
            return pool_ops.pool_amount(conn)

    def distribute(self) -> Distribution:
        with self._write() as conn:
            return pool_ops.distribute(conn)

    def withdraw(self, amount: int | None = None) -> JournalEntry:
        with self._write() as conn:
            return pool_ops.withdraw(conn, self._actor, amount)

    def check(self) -> Consistency:
        with self._read() as conn, conn.begin():
            return pool_ops.check(conn)
