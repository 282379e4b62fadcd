"""The SQL ledger: accounts, API keys and charges (reserve / settle / release / recover).

Pool operations (nodes, distribution, withdrawal) and the consistency check live
in ``teeshard.ledger.sql.pool``; this class delegates to them. Escrow credits and
epoch payouts (the bridge to settlement on chain) come from ``sql.bridge.BridgeOps``.

Identity: an ``SqlLedger`` acts as ``actor``, a name. Whoever can write to the
database can claim any name, so direct database access is for the one party that
runs the ledger (its owner, and its own entry nodes). Where several parties
share a ledger, they reach it through the ledger service (``teeshard ledger
serve``, ``teeshard.ledger.service``), which derives the actor from a per-actor
key and holds the only database credentials. The first ``open`` of an empty
database makes its actor the owner, as deploying a contract does.

Each ``SqlLedger`` object is one entry-node process: its ``incarnation`` is its
lease id, renewed by every reservation and by ``heartbeat``.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING

from sqlalchemy import Connection, insert, select, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from teeshard.ledger.interface import (
    BackendError,
    Balance,
    Consistency,
    Distribution,
    DuplicateKey,
    InvalidAmount,
    JournalEntry,
    LedgerError,
    NodeInfo,
    NodeRecord,
    ReservationRecord,
    Unauthorized,
    UnknownAccount,
    UnknownRequest,
    check_amount,
)
from teeshard.ledger.keys import hash_api_key
from teeshard.ledger.sql import actors, audit, charges
from teeshard.ledger.sql import pool as pool_ops
from teeshard.ledger.sql.bridge import BridgeOps
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
from teeshard.ledger.sql.schema import (
    LIMIT,
    POOL,
    TREASURY,
    accounts,
    api_keys,
    entries,
    journal,
    reservations,
)

if TYPE_CHECKING:
    from teeshard.attest.receipts import Receipt
    from teeshard.ledger.claims import AttestedNode, OperatorClaim

DEFAULT_LEASE_TTL_S = 60.0  # a process that misses heartbeats this long loses its reservations


class SqlLedger(BridgeOps):
    def __init__(
        self,
        engines: Engines,
        actor: str,
        incarnation: str | None = None,
        *,
        lease_ttl_s: float = DEFAULT_LEASE_TTL_S,
    ) -> None:
        if not actor:
            raise ValueError("a ledger actor name is required")
        self.engines = engines
        self._actor = actor
        # Reservations made through this object carry its lease id; recover()
        # releases only reservations whose lease has expired.
        self.incarnation = incarnation or uuid.uuid4().hex
        self.lease_ttl_s = lease_ttl_s

    @classmethod
    def open(
        cls,
        url: str,
        actor: str,
        *,
        owner: str | None = None,
        run_migrations: bool = True,
        lease_ttl_s: float = DEFAULT_LEASE_TTL_S,
    ) -> SqlLedger:
        engines = make_engines(url)
        if run_migrations:
            migrate(engines)
        ledger = cls(engines, actor, lease_ttl_s=lease_ttl_s)
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

    def as_actor(self, actor: str, *, lease_ttl_s: float | None = None) -> SqlLedger:
        """The same database, acting as someone else (a new incarnation: a new lease)."""
        ttl = self.lease_ttl_s if lease_ttl_s is None else lease_ttl_s
        return SqlLedger(self.engines, actor, lease_ttl_s=ttl)

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

    def _ledger_id(self, conn: Connection) -> str:
        return get_meta(conn, "ledger_id") or ""

    def add_actor_key(self, actor: str) -> str:
        """A new key for ``actor`` at the ledger service (owner); shown once, stored hashed."""
        with self._write() as conn:
            self._require_owner(conn, "make actor keys")
            return actors.add_actor_key(conn, actor)

    def actor_for_key(self, key: str) -> str:
        with self._read() as conn:
            return actors.actor_for_key(conn, key)

    def ledger_id(self) -> str:
        """What operator claims name: this ledger's random id (made by migration 0002)."""
        with self._read() as conn:
            return self._ledger_id(conn)

    # -- accounts --------------------------------------------------------------------

    def open_account(self, account: str) -> None:
        if (
            not isinstance(account, str)
            or not account
            or len(account) > 128
            or account.startswith("@")
        ):
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
        try:
            with self._write() as conn:
                # SQL deposits record a payment received elsewhere, so only the owner mints.
                self._require_owner(conn, "record deposits")
                row = lock_account(conn, account)
                if account.startswith("@"):
                    raise UnknownAccount(f"no account {account!r}")
                if row.available + amount >= LIMIT:
                    raise InvalidAmount(
                        f"a deposit of {amount} would take {account!r} to {row.available + amount}, "
                        f"above the limit of a balance ({LIMIT - 1})"
                    )
                return apply(conn, "deposit", account, available=amount)
        except BackendError as exc:
            if isinstance(exc.__cause__, IntegrityError):  # a CHECK on the balances
                raise InvalidAmount(f"a deposit of {amount} would exceed a balance limit") from None
            raise

    def balance(self, account: str) -> Balance:
        with self._read() as conn:
            row = conn.execute(select(accounts).where(accounts.c.id == account)).one_or_none()
        if row is None or account == POOL:  # the treasury shows its earnings
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

    # -- charges (see sql.charges) ---------------------------------------------------

    def authorize_entry(
        self, entry: str, *, spend_limit: int | None = None, period_s: float = 86400.0
    ) -> None:
        """Let ``entry`` charge; at most ``spend_limit`` per ``period_s`` (None: no limit)."""
        if spend_limit is not None:
            check_amount(spend_limit, "spend limit")
        if not period_s > 0:
            raise InvalidAmount(f"the spend period must be positive, got {period_s!r}")
        with self._write() as conn:
            self._require_owner(conn, "authorise entry nodes")
            values = {"spend_limit": spend_limit, "period_s": float(period_s)}
            if conn.execute(select(entries).where(entries.c.name == entry)).first() is None:
                conn.execute(insert(entries).values(name=entry, created_at=now(), **values))
            else:
                conn.execute(update(entries).where(entries.c.name == entry).values(**values))

    def reservation(self, request_id: str) -> ReservationRecord:
        with self._read() as conn:
            row = conn.execute(
                select(reservations).where(reservations.c.request_id == request_id)
            ).one_or_none()
        if row is None:
            raise UnknownRequest(f"no reservation for request {request_id!r}")
        return reservation_record(row)

    def reserve(
        self,
        request_id: str,
        account: str,
        amount: int,
        *,
        key_hash: str | None = None,
        max_tokens: int | None = None,
        idempotency_key: str | None = None,
    ) -> ReservationRecord:
        try:
            with self._write() as conn:
                return charges.reserve(
                    conn, self._actor, (self.incarnation, self.lease_ttl_s), request_id,
                    account, amount, key_hash=key_hash, max_tokens=max_tokens,
                    idempotency_key=idempotency_key,
                )  # fmt: skip
        except BackendError as exc:
            # Two replays raced past the check: the loser sees the winner's row.
            if isinstance(exc.__cause__, IntegrityError):
                if idempotency_key is not None:
                    with self._read() as conn:
                        found = conn.execute(
                            select(reservations).where(
                                (reservations.c.account_id == account)
                                & (reservations.c.idempotency_key == idempotency_key)
                            )
                        ).one_or_none()
                    if found is not None:
                        return reservation_record(found)
                with contextlib.suppress(UnknownRequest):
                    return charges.replayed(
                        self.reservation(request_id), self._actor, account, amount
                    )
            raise

    def settle(
        self,
        request_id: str,
        cost: int,
        served: Mapping[str, int],
        *,
        receipts: Sequence[Receipt] = (),
    ) -> ReservationRecord:
        try:
            with self._write() as conn:
                return charges.settle(conn, self._actor, request_id, cost, served, receipts)
        except BackendError as exc:
            if isinstance(exc.__cause__, IntegrityError):  # a CHECK on the balances
                raise InvalidAmount(
                    f"settling {request_id!r} at {cost} would take the pool past its limit "
                    f"({LIMIT - 1}); distribute first"
                ) from None
            raise

    def release(self, request_id: str) -> ReservationRecord:
        with self._write() as conn:
            charges.require_entry(conn, self._actor, "release charges")
            row = charges.open_reservation(conn, self._actor, request_id)
            return charges.release_row(conn, row, "release")

    def heartbeat(self) -> None:
        """Renew this process's lease: its reservations are not recovered while it lives."""
        with self._write() as conn:
            charges.require_entry(conn, self._actor, "hold a lease")
            charges.renew_lease(conn, self._actor, self.incarnation, self.lease_ttl_s)

    def recover(self, older_than_s: float | None = None) -> list[str]:
        """Release open reservations whose process lease expired (this entry's; owner: all)."""
        with self._read() as conn:
            holder: str | None = self._actor
            if get_meta(conn, "owner") == self._actor:
                holder = None
            else:
                charges.require_entry(conn, self._actor, "recover reservations")
            candidates = charges.expired_reservations(conn, holder, older_than_s)
        released = []
        for request_id, account in candidates:
            with self._write() as conn:
                if charges.recover_one(conn, request_id, account):
                    released.append(request_id)
        return released

    def open_reservations(self, older_than_s: float = 0.0) -> list[ReservationRecord]:
        """Reservations still open after ``older_than_s`` seconds: stuck money."""
        with self._read() as conn:
            return charges.open_reservations(conn, older_than_s)

    # -- the pool (see sql.pool) -----------------------------------------------------

    def register_node(self, node: NodeInfo, *, claim: OperatorClaim | None = None) -> NodeRecord:
        with self._write() as conn:
            return pool_ops.register_node(conn, self._actor, node, claim, self._ledger_id(conn))

    def admit_node(
        self, node_id: str, manifest_hash: str, *, attested: AttestedNode | None = None
    ) -> NodeRecord:
        with self._write() as conn:
            if get_meta(conn, "owner") != self._actor:
                charges.require_entry(conn, self._actor, "admit nodes")
            return pool_ops.admit_node(
                conn, node_id, manifest_hash, attested, self._ledger_id(conn)
            )

    def set_admission_epoch(self, seconds: float) -> None:
        """How long an admission lasts before the node must be attested again (owner)."""
        if not seconds > 0:
            raise InvalidAmount(f"the admission epoch must be positive, got {seconds!r}")
        with self._write() as conn:
            self._require_owner(conn, "set the admission epoch")
            set_meta(conn, "admission_ttl_s", repr(float(seconds)))

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

    def withdraw_treasury(self, amount: int | None = None) -> JournalEntry:
        """Pay out the treasury (the owner): revenue that no verified work earned."""
        with self._write() as conn:
            self._require_owner(conn, "withdraw the treasury")
            return pool_ops.withdraw(conn, TREASURY, amount)

    def check(self) -> Consistency:
        """The audit, in one snapshot (REPEATABLE READ on PostgreSQL)."""
        engine = self.engines.read
        if self.engines.dialect == "postgresql":
            engine = engine.execution_options(isolation_level="REPEATABLE READ")
        try:
            with engine.connect() as conn, conn.begin():
                return audit.check(conn)
        except SQLAlchemyError as exc:
            raise BackendError(f"ledger database error: {exc.__class__.__name__}: {exc}") from exc
