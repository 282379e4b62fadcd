"""Trust and bounds (issue 9): claims, leases, credits by cost, limits, STRICT tables.

- every balance below 2^62 (CHECK), so a sum of two never leaves a 64-bit integer;
  on SQLite every table is rebuilt STRICT, so a value that is not an integer is
  refused instead of being stored as a float;
- entries: a spend limit per period; reservations: the key hash that authorised
  them, the most tokens they may credit, the client's idempotency key (unique per
  account); nodes: the attested certificate and when the admission expires;
  work: the cost credited and the layers run; distributions: the treasury's part;
- new tables: ``leases`` (entry-node processes) and ``actor_keys`` (the ledger
  service's per-actor keys, hashed); a ``@treasury`` account; a ``ledger_id``.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01
"""

from __future__ import annotations

import time
import uuid

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

LIMIT = 2**62
_APPEND_ONLY = ("journal", "work", "distributions")

# The final SQLite tables (STRICT allows only INTEGER, REAL, TEXT, BLOB, ANY).
_SQLITE_TABLES = {
    "ledger_meta": """key TEXT PRIMARY KEY, value TEXT NOT NULL""",
    "accounts": f"""id TEXT PRIMARY KEY,
        available INTEGER NOT NULL CHECK (available >= 0 AND available < {LIMIT}),
        reserved INTEGER NOT NULL CHECK (reserved >= 0 AND reserved < {LIMIT}),
        earnings INTEGER NOT NULL CHECK (earnings >= 0 AND earnings < {LIMIT}),
        created_at REAL NOT NULL""",
    "api_keys": """key_hash TEXT PRIMARY KEY,
        account_id TEXT NOT NULL REFERENCES accounts(id), created_at REAL NOT NULL""",
    "entries": """name TEXT PRIMARY KEY, created_at REAL NOT NULL,
        spend_limit INTEGER CHECK (spend_limit IS NULL OR spend_limit > 0),
        period_s REAL NOT NULL DEFAULT 86400 CHECK (period_s > 0)""",
    "reservations": f"""request_id TEXT PRIMARY KEY,
        account_id TEXT NOT NULL REFERENCES accounts(id),
        amount INTEGER NOT NULL CHECK (amount > 0 AND amount < {LIMIT}),
        holder TEXT NOT NULL, incarnation TEXT NOT NULL, state TEXT NOT NULL,
        cost INTEGER NOT NULL CHECK (cost >= 0 AND cost <= amount),
        created_at REAL NOT NULL, closed_at REAL,
        key_hash TEXT, max_tokens INTEGER CHECK (max_tokens IS NULL OR max_tokens > 0),
        idempotency_key TEXT""",
    "nodes": """node_id TEXT PRIMARY KEY,
        operator TEXT NOT NULL REFERENCES accounts(id), url TEXT NOT NULL,
        manifest_hash TEXT NOT NULL, model TEXT NOT NULL, layers TEXT NOT NULL,
        admitted INTEGER NOT NULL, removed INTEGER NOT NULL,
        served_total INTEGER NOT NULL CHECK (served_total >= 0), created_at REAL NOT NULL,
        certificate_pem TEXT, fingerprint TEXT, admitted_until REAL NOT NULL DEFAULT 0""",
    "work": """id INTEGER PRIMARY KEY AUTOINCREMENT,
        request_id TEXT NOT NULL, node_id TEXT NOT NULL, operator TEXT NOT NULL,
        tokens INTEGER NOT NULL CHECK (tokens > 0), epoch INTEGER NOT NULL, at REAL NOT NULL,
        credit INTEGER NOT NULL DEFAULT 0 CHECK (credit >= 0),
        layers INTEGER NOT NULL DEFAULT 0 CHECK (layers >= 0)""",
    "distributions": """epoch INTEGER PRIMARY KEY, at REAL NOT NULL,
        pool_before INTEGER NOT NULL, distributed INTEGER NOT NULL,
        remainder INTEGER NOT NULL, tokens INTEGER NOT NULL,
        treasury INTEGER NOT NULL DEFAULT 0""",
    "journal": f"""seq INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL,
        kind TEXT NOT NULL, account_id TEXT NOT NULL,
        available INTEGER NOT NULL CHECK (abs(available) < {LIMIT}),
        reserved INTEGER NOT NULL CHECK (abs(reserved) < {LIMIT}),
        earnings INTEGER NOT NULL CHECK (abs(earnings) < {LIMIT}),
        pool INTEGER NOT NULL CHECK (abs(pool) < {LIMIT}),
        request_id TEXT, memo TEXT""",
    "leases": """lease_id TEXT PRIMARY KEY, holder TEXT NOT NULL,
        expires_at REAL NOT NULL, created_at REAL NOT NULL""",
    "actor_keys": """key_hash TEXT PRIMARY KEY, actor TEXT NOT NULL, created_at REAL NOT NULL""",
}
_INDEXES = (
    "CREATE INDEX ix_reservations_open ON reservations (state, holder)",
    "CREATE UNIQUE INDEX ux_reservations_idempotency ON reservations (account_id, idempotency_key)",
    "CREATE INDEX ix_work_epoch ON work (epoch)",
    "CREATE INDEX ix_journal_account ON journal (account_id, seq)",
)
_OLD_COLUMNS = {  # what 0001 had, copied into the rebuilt tables
    "ledger_meta": "key, value",
    "accounts": "id, available, reserved, earnings, created_at",
    "api_keys": "key_hash, account_id, created_at",
    "entries": "name, created_at",
    "reservations": "request_id, account_id, amount, holder, incarnation, state, cost, "
    "created_at, closed_at",
    "nodes": "node_id, operator, url, manifest_hash, model, layers, admitted, removed, "
    "served_total, created_at",
    "work": "id, request_id, node_id, operator, tokens, epoch, at",
    "distributions": "epoch, at, pool_before, distributed, remainder, tokens",
    "journal": "seq, at, kind, account_id, available, reserved, earnings, pool, request_id, memo",
}


def upgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        _sqlite_rebuild()
    else:
        _postgres_upgrade()
    meta = sa.table("ledger_meta", sa.column("key"), sa.column("value"))
    op.bulk_insert(meta, [{"key": "ledger_id", "value": uuid.uuid4().hex}])
    accounts = sa.table(
        "accounts",
        sa.column("id"),
        sa.column("available"),
        sa.column("reserved"),
        sa.column("earnings"),
        sa.column("created_at"),
    )
    op.bulk_insert(
        accounts,
        [
            {
                "id": "@treasury",
                "available": 0,
                "reserved": 0,
                "earnings": 0,
                "created_at": time.time(),
            }
        ],
    )


def _sqlite_rebuild() -> None:
    op.execute("PRAGMA legacy_alter_table = ON")  # renames leave references alone
    for table in _OLD_COLUMNS:
        op.execute(f"ALTER TABLE {table} RENAME TO {table}__old")
    for table, columns in _SQLITE_TABLES.items():
        op.execute(f"CREATE TABLE {table} ({columns}) STRICT")
    for table, columns in _OLD_COLUMNS.items():
        op.execute(f"INSERT INTO {table} ({columns}) SELECT {columns} FROM {table}__old")
    for table in reversed(list(_OLD_COLUMNS)):
        op.execute(f"DROP TABLE {table}__old")
    op.execute("PRAGMA legacy_alter_table = OFF")
    for statement in _INDEXES:
        op.execute(statement)
    for table in _APPEND_ONLY:
        for action in ("UPDATE", "DELETE"):
            op.execute(
                f"CREATE TRIGGER {table}_no_{action.lower()} BEFORE {action} ON {table} "
                f"BEGIN SELECT RAISE(ABORT, '{table} is append-only'); END"
            )


def _postgres_upgrade() -> None:
    for column in ("available", "reserved", "earnings"):
        op.create_check_constraint(f"{column}_below_limit", "accounts", f"{column} < {LIMIT}")
    op.create_check_constraint("amount_below_limit", "reservations", f"amount < {LIMIT}")
    for column in ("available", "reserved", "earnings", "pool"):
        op.create_check_constraint(
            f"journal_{column}_bounded", "journal", f"abs({column}) < {LIMIT}"
        )
    op.add_column("entries", sa.Column("spend_limit", sa.BigInteger))
    op.add_column(
        "entries", sa.Column("period_s", sa.Float, nullable=False, server_default="86400")
    )
    op.add_column("reservations", sa.Column("key_hash", sa.String(64)))
    op.add_column("reservations", sa.Column("max_tokens", sa.BigInteger))
    op.add_column("reservations", sa.Column("idempotency_key", sa.String(128)))
    op.create_index(
        "ux_reservations_idempotency",
        "reservations",
        ["account_id", "idempotency_key"],
        unique=True,
    )
    op.add_column("nodes", sa.Column("certificate_pem", sa.Text))
    op.add_column("nodes", sa.Column("fingerprint", sa.String(64)))
    op.add_column(
        "nodes", sa.Column("admitted_until", sa.Float, nullable=False, server_default="0")
    )
    op.add_column("work", sa.Column("credit", sa.BigInteger, nullable=False, server_default="0"))
    op.add_column("work", sa.Column("layers", sa.Integer, nullable=False, server_default="0"))
    op.add_column(
        "distributions", sa.Column("treasury", sa.BigInteger, nullable=False, server_default="0")
    )
    op.create_table(
        "leases",
        sa.Column("lease_id", sa.String(32), primary_key=True),
        sa.Column("holder", sa.String(128), nullable=False),
        sa.Column("expires_at", sa.Float, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
    )
    op.create_table(
        "actor_keys",
        sa.Column("key_hash", sa.String(64), primary_key=True),
        sa.Column("actor", sa.String(128), nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
    )


def downgrade() -> None:
    """Back to 0001's columns (SQLite keeps its tables STRICT, which 0001 reads alike)."""
    op.execute("DELETE FROM ledger_meta WHERE key = 'ledger_id'")
    op.execute("DELETE FROM accounts WHERE id = '@treasury'")
    op.drop_table("actor_keys")
    op.drop_table("leases")
    op.drop_index("ux_reservations_idempotency", "reservations")
    dialect = op.get_bind().dialect.name
    columns = {
        "entries": ("spend_limit", "period_s"),
        "reservations": ("key_hash", "max_tokens", "idempotency_key"),
        "nodes": ("certificate_pem", "fingerprint", "admitted_until"),
    }
    if dialect == "postgresql":  # append-only tables keep their added columns on SQLite
        columns |= {"work": ("credit", "layers"), "distributions": ("treasury",)}
        for column in ("available", "reserved", "earnings"):
            op.drop_constraint(f"{column}_below_limit", "accounts")
        op.drop_constraint("amount_below_limit", "reservations")
        for column in ("available", "reserved", "earnings", "pool"):
            op.drop_constraint(f"journal_{column}_bounded", "journal")
    for table, names in columns.items():
        for name in names:
            if dialect == "sqlite" and name in ("spend_limit", "period_s", "max_tokens"):
                continue  # a column with a CHECK cannot be dropped on SQLite; it stays unused
            op.execute(f"ALTER TABLE {table} DROP COLUMN {name}")
