"""Backends for the ledger suite: each gives an owner, an authorised entry node and new accounts.

Every backend is real: SQLite files, a PostgreSQL server, the compiled
contract on py-evm (eth-tester) in-process, and on anvil.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from teeshard.ledger.interface import Ledger, ReservationRecord
from teeshard.ledger.keys import hash_api_key

POSTGRES_ENV = "TEESHARD_TEST_POSTGRES_URL"


@dataclass
class ClaimRoute:
    """Who the real node says operates it (``teeshard node --operator``); tests set it."""

    operator: str | None = None


@dataclass
class World:
    """One fresh ledger and the identities a test needs."""

    name: str
    url: str  # how another process opens it (empty for the in-process chain)
    owner: Ledger
    entry: Ledger
    _counter: Iterator[int] = field(default_factory=itertools.count)
    _env: dict[str, str] = field(default_factory=dict)  # what a subprocess needs (keys)
    keys: dict[str, str] = field(default_factory=dict)  # account -> its API key

    @property
    def sql(self) -> bool:
        """An SQL ledger behind it (directly, or through the ledger service)."""
        return self.name in ("sqlite", "postgres", "service")

    def new_account(self, funds: int = 0) -> tuple[str, Ledger]:
        """An account with funds and an API key (``keys``), and the ledger acting as it."""
        account, ledger = self._new_account(funds)
        key = f"tsk_{self.name}_{account}"
        ledger.add_api_key(account, key)
        self.keys[account] = key
        return account, ledger

    def _new_account(self, funds: int) -> tuple[str, Ledger]:
        raise NotImplementedError

    def key_hash(self, account: str) -> str | None:
        key = self.keys.get(account)
        return hash_api_key(key) if key else None

    def reserve(
        self, ledger: Ledger, request_id: str, account: str, amount: int, **options: object
    ) -> ReservationRecord:
        """A reservation as an honest entry makes it: with the user's key hash."""
        options.setdefault("key_hash", self.key_hash(account))
        return ledger.reserve(request_id, account, amount, **options)  # type: ignore[arg-type]

    def stranger(self) -> Ledger:
        """An identity with no role at all."""
        raise NotImplementedError

    def another_entry(self) -> Ledger:
        raise NotImplementedError

    def restarted_entry(self) -> Ledger:
        """The entry node's identity in a new process incarnation."""
        raise NotImplementedError

    def expire_leases(self) -> None:
        raise NotImplementedError

    def subprocess_env(self) -> dict[str, str]:
        return dict(self._env)


@dataclass
class SqlWorld(World):
    def _new_account(self, funds: int = 0) -> tuple[str, Ledger]:
        name = f"user{next(self._counter)}"
        self.owner.open_account(name)
        if funds:
            self.owner.deposit(name, funds)
        return name, self.owner.as_actor(name)  # type: ignore[attr-defined]

    def stranger(self) -> Ledger:
        return self.owner.as_actor("stranger")  # type: ignore[attr-defined,no-any-return]

    def another_entry(self) -> Ledger:
        name = f"entry{next(self._counter)}"
        self.owner.authorize_entry(name)
        return self.owner.as_actor(name)  # type: ignore[attr-defined,no-any-return]

    def restarted_entry(self) -> Ledger:
        return self.owner.as_actor(self.entry.actor)  # type: ignore[attr-defined,no-any-return]

    def expire_leases(self) -> None:
        """Every entry process so far stops heartbeating and its lease runs out."""
        import sqlalchemy as sa

        with self.owner.engines.write.begin() as conn:  # type: ignore[attr-defined]
            conn.execute(sa.text("UPDATE leases SET expires_at = 0"))


def sql_world(name: str, url: str) -> SqlWorld:
    from teeshard.ledger.sql import SqlLedger

    owner = SqlLedger.open(url, "owner")
    owner.authorize_entry("entry-1")
    world = SqlWorld(name, url, owner, owner.as_actor("entry-1"))
    world._env = {"TEESHARD_LEDGER_ACTOR": "entry-1"}
    return world


@dataclass
class ServiceWorld(World):
    """The SQL ledger (SQLite) behind ``teeshard ledger serve``: every party holds a key."""

    direct: object = None  # the owner's direct SqlLedger (to make keys, expire leases)
    base_url: str = ""

    def _remote(self, actor: str) -> Ledger:
        from teeshard.ledger.remote import RemoteLedger

        key = self.direct.add_actor_key(actor)  # type: ignore[attr-defined]
        return RemoteLedger(self.base_url, key)

    def _new_account(self, funds: int = 0) -> tuple[str, Ledger]:
        name = f"user{next(self._counter)}"
        self.owner.open_account(name)
        if funds:
            self.owner.deposit(name, funds)
        return name, self._remote(name)

    def stranger(self) -> Ledger:
        return self._remote(f"stranger{next(self._counter)}")

    def another_entry(self) -> Ledger:
        name = f"entry{next(self._counter)}"
        self.owner.authorize_entry(name)
        return self._remote(name)

    def restarted_entry(self) -> Ledger:
        return self._remote(self.entry.actor)

    def expire_leases(self) -> None:
        import sqlalchemy as sa

        with self.direct.engines.write.begin() as conn:  # type: ignore[attr-defined]
            conn.execute(sa.text("UPDATE leases SET expires_at = 0"))


def reset_postgres(url: str) -> None:
    import sqlalchemy as sa

    from teeshard.ledger.sql.engine import normalise_url

    engine = sa.create_engine(normalise_url(url))
    with engine.begin() as conn:
        conn.exec_driver_sql("DROP SCHEMA IF EXISTS public CASCADE")
        conn.exec_driver_sql("CREATE SCHEMA public")
    engine.dispose()


def postgres_url() -> str | None:
    """The test server's URL, or None (with the reason printed by the skip)."""
    return os.environ.get(POSTGRES_ENV) or None


@dataclass
class EvmWorld(World):
    chain: object = None
    address: str = ""
    block: int = 0

    def _key(self):  # type: ignore[no-untyped-def]
        from teeshard.ledger.evm.chain import new_key

        key = new_key()
        self.chain.fund(key.address, 10**18)  # type: ignore[attr-defined]
        return key

    def _new_account(self, funds: int = 0) -> tuple[str, Ledger]:
        key = self._key()
        ledger = self.owner.as_key(key)  # type: ignore[attr-defined]
        ledger.open_account(key.address)
        if funds:
            self.owner.deposit(key.address, funds)
        return str(key.address), ledger

    def stranger(self) -> Ledger:
        return self.owner.as_key(self._key())  # type: ignore[attr-defined,no-any-return]

    def another_entry(self) -> Ledger:
        key = self._key()
        self.owner.authorize_entry(key.address)
        return self.owner.as_key(key)  # type: ignore[attr-defined,no-any-return]

    def restarted_entry(self) -> Ledger:
        return self.owner.as_key(self.entry.key)  # type: ignore[attr-defined,no-any-return]

    def expire_leases(self) -> None:
        """On chain, recovery goes by holder and process (leases are the SQL ledger's)."""


def evm_world(name: str, chain: object, rpc_url: str = "") -> EvmWorld:
    from teeshard.ledger.evm import EvmLedger
    from teeshard.ledger.evm.chain import new_key

    owner_key, entry_key = new_key(), new_key()
    for key in (owner_key, entry_key):
        chain.fund(key.address, 10**19)  # type: ignore[attr-defined]
    address, block = chain.deploy(owner_key)  # type: ignore[attr-defined]
    owner = EvmLedger(chain, address, owner_key, from_block=block)  # type: ignore[arg-type]
    owner.authorize_entry(entry_key.address)
    url = f"evm+{rpc_url}?contract={address}&from_block={block}" if rpc_url else ""
    world = EvmWorld(name, url, owner, owner.as_key(entry_key), chain=chain, address=address,
                     block=block)  # fmt: skip
    world._env = {"TEESHARD_EVM_KEY": entry_key.key.hex()}
    return world


def anvil_path() -> str | None:
    from teeshard.ledger.anvil import find_anvil

    return find_anvil(Path(__file__).resolve().parents[2])
