"""The bridge to epoch settlement on chain (issue 9, item 7): escrow credits and payouts.

- ``escrow_credits``: one row per on-chain escrow deposit credited to an account,
  keyed by its unique reference (``escrow:<tx hash>:<log index>``), so a rescan or
  a second bridge process can never credit the same deposit twice (append-only);
- ``payout_epochs`` and ``payouts``: what each settlement epoch took out of the
  SQL ledger (operators' earnings, users' refunds) to pay on chain, one row per
  epoch and account and kind, so paying an epoch again is a no-op (payouts are
  append-only; an epoch row records when its root was posted);
- ``refund_requests``: users who asked for their unspent tokens back.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

LIMIT = 2**62
_APPEND_ONLY = ("escrow_credits", "payouts")

_SQLITE_TABLES = {
    "escrow_credits": f"""reference TEXT PRIMARY KEY,
        account_id TEXT NOT NULL REFERENCES accounts(id),
        tokens INTEGER NOT NULL CHECK (tokens > 0 AND tokens < {LIMIT}),
        block INTEGER NOT NULL CHECK (block >= 0), journal_seq INTEGER NOT NULL,
        created_at REAL NOT NULL""",
    "payout_epochs": f"""epoch INTEGER PRIMARY KEY CHECK (epoch >= 0),
        contract TEXT NOT NULL, total INTEGER NOT NULL CHECK (total > 0 AND total < {LIMIT}),
        created_at REAL NOT NULL, posted_number INTEGER, root TEXT, posted_at REAL""",
    "payouts": f"""epoch INTEGER NOT NULL REFERENCES payout_epochs(epoch),
        account_id TEXT NOT NULL REFERENCES accounts(id),
        kind TEXT NOT NULL CHECK (kind IN ('earnings', 'refund')),
        tokens INTEGER NOT NULL CHECK (tokens > 0 AND tokens < {LIMIT}),
        journal_seq INTEGER NOT NULL, PRIMARY KEY (epoch, account_id, kind)""",
    "refund_requests": """account_id TEXT PRIMARY KEY REFERENCES accounts(id),
        requested_at REAL NOT NULL""",
}


def upgrade() -> None:
    dialect = op.get_bind().dialect.name
    if dialect == "sqlite":
        for table, columns in _SQLITE_TABLES.items():
            op.execute(f"CREATE TABLE {table} ({columns}) STRICT")
        for table in _APPEND_ONLY:
            for action in ("UPDATE", "DELETE"):
                op.execute(
                    f"CREATE TRIGGER {table}_no_{action.lower()} BEFORE {action} ON {table} "
                    f"BEGIN SELECT RAISE(ABORT, '{table} is append-only'); END"
                )
        return
    _postgres_tables()
    for table in _APPEND_ONLY:  # teeshard_append_only() comes from migration 0001
        op.execute(
            f"CREATE TRIGGER {table}_append_only BEFORE UPDATE OR DELETE ON {table} "
            "FOR EACH ROW EXECUTE FUNCTION teeshard_append_only()"
        )


def _postgres_tables() -> None:
    op.create_table(
        "escrow_credits",
        sa.Column("reference", sa.String(128), primary_key=True),
        sa.Column("account_id", sa.String(128), sa.ForeignKey("accounts.id"), nullable=False),
        sa.Column("tokens", sa.BigInteger, nullable=False),
        sa.Column("block", sa.BigInteger, nullable=False),
        sa.Column("journal_seq", sa.Integer, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.CheckConstraint(f"tokens > 0 AND tokens < {LIMIT}", name="escrow_tokens_bounded"),
    )
    op.create_table(
        "payout_epochs",
        sa.Column("epoch", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("contract", sa.String(64), nullable=False),
        sa.Column("total", sa.BigInteger, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("posted_number", sa.Integer),
        sa.Column("root", sa.String(80)),
        sa.Column("posted_at", sa.Float),
        sa.CheckConstraint(f"total > 0 AND total < {LIMIT}", name="payout_total_bounded"),
    )
    op.create_table(
        "payouts",
        sa.Column("epoch", sa.Integer, sa.ForeignKey("payout_epochs.epoch"), primary_key=True),
        sa.Column("account_id", sa.String(128), sa.ForeignKey("accounts.id"), primary_key=True),
        sa.Column("kind", sa.String(16), primary_key=True),
        sa.Column("tokens", sa.BigInteger, nullable=False),
        sa.Column("journal_seq", sa.Integer, nullable=False),
        sa.CheckConstraint(f"tokens > 0 AND tokens < {LIMIT}", name="payout_tokens_bounded"),
        sa.CheckConstraint("kind IN ('earnings', 'refund')", name="payout_kind"),
    )
    op.create_table(
        "refund_requests",
        sa.Column("account_id", sa.String(128), sa.ForeignKey("accounts.id"), primary_key=True),
        sa.Column("requested_at", sa.Float, nullable=False),
    )


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        for table in _APPEND_ONLY:
            for action in ("update", "delete"):
                op.execute(f"DROP TRIGGER IF EXISTS {table}_no_{action}")
    for table in ("refund_requests", "payouts", "payout_epochs", "escrow_credits"):
        op.drop_table(table)
