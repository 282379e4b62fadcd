"""The SQL ledger backend: SQLite by default, PostgreSQL by URL, Alembic-managed schema."""

from teeshard.ledger.sql.store import SqlLedger

__all__ = ["SqlLedger"]
