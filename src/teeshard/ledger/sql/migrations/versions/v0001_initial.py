"""Initial ledger schema: accounts, keys, entries, reservations, nodes, work, journal.

Revision ID: 0001
Revises:
Create Date: 2026-11-22
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

_APPEND_ONLY = ("journal", "work", "distributions")


def upgrade() -> None:
    op.create_table(
        "ledger_meta",
        sa.Column("key", sa.String(64), primary_key=True),
        sa.Column("value", sa.String(512), nullable=False),
    )
    op.create_table(
        "accounts",
        sa.Column("id", sa.String(128), primary_key=True),
        sa.Column("available", sa.BigInteger, nullable=False),
        sa.Column("reserved", sa.BigInteger, nullable=False),
        sa.Column("earnings", sa.BigInteger, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.CheckConstraint("available >= 0", name="available_not_negative"),
        sa.CheckConstraint("reserved >= 0", name="reserved_not_negative"),
        sa.CheckConstraint("earnings >= 0", name="earnings_not_negative"),
    )
    op.create_table(
        "api_keys",
        sa.Column("key_hash", sa.String(64), primary_key=True),
        sa.Column("account_id", sa.String(128), sa.ForeignKey("accounts.id"), nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
    )
    op.create_table(
        "entries",
        sa.Column("name", sa.String(128), primary_key=True),
        sa.Column("created_at", sa.Float, nullable=False),
    )
    op.create_table(
        "reservations",
        sa.Column("request_id", sa.String(128), primary_key=True),
        sa.Column("account_id", sa.String(128), sa.ForeignKey("accounts.id"), nullable=False),
        sa.Column("amount", sa.BigInteger, nullable=False),
        sa.Column("holder", sa.String(128), nullable=False),
        sa.Column("incarnation", sa.String(32), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("cost", sa.BigInteger, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("closed_at", sa.Float),
        sa.CheckConstraint("amount > 0", name="amount_positive"),
        sa.CheckConstraint("cost >= 0 AND cost <= amount", name="cost_within_amount"),
    )
    op.create_index("ix_reservations_open", "reservations", ["state", "holder"])
    op.create_table(
        "nodes",
        sa.Column("node_id", sa.String(256), primary_key=True),
        sa.Column("operator", sa.String(128), sa.ForeignKey("accounts.id"), nullable=False),
        sa.Column("url", sa.String(512), nullable=False),
        sa.Column("manifest_hash", sa.String(64), nullable=False),
        sa.Column("model", sa.String(256), nullable=False),
        sa.Column("layers", sa.String(32), nullable=False),
        sa.Column("admitted", sa.Boolean, nullable=False),
        sa.Column("removed", sa.Boolean, nullable=False),
        sa.Column("served_total", sa.BigInteger, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
    )
    op.create_table(
        "work",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("request_id", sa.String(128), nullable=False),
        sa.Column("node_id", sa.String(256), nullable=False),
        sa.Column("operator", sa.String(128), nullable=False),
        sa.Column("tokens", sa.BigInteger, nullable=False),
        sa.Column("epoch", sa.Integer, nullable=False),
        sa.Column("at", sa.Float, nullable=False),
        sa.CheckConstraint("tokens > 0", name="tokens_positive"),
    )
    op.create_index("ix_work_epoch", "work", ["epoch"])
    op.create_table(
        "distributions",
        sa.Column("epoch", sa.Integer, primary_key=True),
        sa.Column("at", sa.Float, nullable=False),
        sa.Column("pool_before", sa.BigInteger, nullable=False),
        sa.Column("distributed", sa.BigInteger, nullable=False),
        sa.Column("remainder", sa.BigInteger, nullable=False),
        sa.Column("tokens", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "journal",
        sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("at", sa.Float, nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("account_id", sa.String(128), nullable=False),
        sa.Column("available", sa.BigInteger, nullable=False),
        sa.Column("reserved", sa.BigInteger, nullable=False),
        sa.Column("earnings", sa.BigInteger, nullable=False),
        sa.Column("pool", sa.BigInteger, nullable=False),
        sa.Column("request_id", sa.String(128)),
        sa.Column("memo", sa.String(256)),
    )
    op.create_index("ix_journal_account", "journal", ["account_id", "seq"])
    _append_only_triggers()


def _append_only_triggers() -> None:
    """The journal, the work log and past distributions can be added to, never changed."""
    dialect = op.get_bind().dialect.name
    if dialect == "sqlite":
        for table in _APPEND_ONLY:
            for action in ("UPDATE", "DELETE"):
                op.execute(
                    f"CREATE TRIGGER {table}_no_{action.lower()} BEFORE {action} ON {table} "
                    f"BEGIN SELECT RAISE(ABORT, '{table} is append-only'); END"
                )
    elif dialect == "postgresql":
        op.execute(
            "CREATE FUNCTION teeshard_append_only() RETURNS trigger LANGUAGE plpgsql AS $$ "
            "BEGIN RAISE EXCEPTION '% is append-only', TG_TABLE_NAME; END $$"
        )
        for table in _APPEND_ONLY:
            op.execute(
                f"CREATE TRIGGER {table}_append_only BEFORE UPDATE OR DELETE ON {table} "
                "FOR EACH ROW EXECUTE FUNCTION teeshard_append_only()"
            )


def downgrade() -> None:
    for table in (
        "journal",
        "distributions",
        "work",
        "nodes",
        "reservations",
        "entries",
        "api_keys",
        "accounts",
        "ledger_meta",
    ):
        op.drop_table(table)
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP FUNCTION IF EXISTS teeshard_append_only()")
