"""Engines for the SQL ledger: SQLite (WAL, writers serialised) or PostgreSQL; migrations.

SQLite: every write transaction starts with ``BEGIN IMMEDIATE``, so a writer
takes the database's write lock before it reads the balance it will change;
two concurrent charges therefore run one after the other instead of both
reading the same balance. Reads go through a second engine with deferred
transactions, which WAL lets run beside a writer.

PostgreSQL: READ COMMITTED with ``SELECT ... FOR UPDATE`` on the rows a
transaction changes (see ``store``); locks are always taken in one order (pool,
then accounts by id, then the reservation) so concurrent writers cannot deadlock.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL, make_url

SQLITE_BUSY_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Engines:
    url: URL
    write: Engine  # transactions that change balances
    read: Engine  # snapshots for balance, history, listings

    @property
    def dialect(self) -> str:
        return self.url.get_backend_name()

    def dispose(self) -> None:
        self.write.dispose()
        if self.read is not self.write:
            self.read.dispose()


def normalise_url(url: str) -> URL:
    """Accept ``postgresql://`` (psycopg 3 is the driver) and plain SQLite paths."""
    if "://" not in url:
        url = f"sqlite:///{Path(url)}"
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    if parsed.get_backend_name() not in ("sqlite", "postgresql"):
        raise ValueError(
            f"unsupported ledger database {parsed.drivername!r}: use sqlite or postgresql"
        )
    return parsed


def make_engines(url: str, pool_size: int = 8) -> Engines:
    parsed = normalise_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database in (None, "", ":memory:"):
            raise ValueError("the SQLite ledger needs a file (sqlite:///path/to/ledger.db)")
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        return Engines(
            parsed, _sqlite_engine(parsed, "BEGIN IMMEDIATE"), _sqlite_engine(parsed, "BEGIN")
        )
    engine = create_engine(
        parsed, pool_size=pool_size, max_overflow=pool_size * 8, pool_pre_ping=True
    )
    return Engines(parsed, engine, engine)


def _sqlite_engine(url: URL, begin: str) -> Engine:
    engine = create_engine(
        url,
        connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S, "check_same_thread": False},
        pool_size=4,
        max_overflow=64,
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _: Any) -> None:
        # Take transaction control away from the sqlite3 module so BEGIN is ours.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=FULL")  # a committed charge survives power loss
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        connection.exec_driver_sql(begin)

    return engine


def _alembic_config() -> Config:
    config = Config()
    location = resources.files("teeshard.ledger.sql").joinpath("migrations")
    config.set_main_option("script_location", str(location))
    return config


def migrate(engines: Engines, revision: str = "head") -> None:
    """Bring the schema to ``revision``; safe to run on every start."""
    config = _alembic_config()
    # Alembic logs every start at INFO; the ledger's users need only its warnings.
    logging.getLogger("alembic").setLevel(logging.WARNING)
    with engines.write.begin() as connection:
        if engines.dialect == "postgresql":
            # Two processes starting on an empty database migrate one after the other.
            connection.exec_driver_sql("SELECT pg_advisory_xact_lock(7406541)")
        config.attributes["connection"] = connection
        command.upgrade(config, revision)


def downgrade(engines: Engines, revision: str) -> None:
    """Take the schema back to ``revision`` (``base``: no tables); for operators and tests."""
    config = _alembic_config()
    with engines.write.begin() as connection:
        config.attributes["connection"] = connection
        command.downgrade(config, revision)


def current_revision(engines: Engines) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engines.read.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()
