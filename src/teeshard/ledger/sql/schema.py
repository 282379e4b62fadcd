"""The SQL ledger's tables (SQLAlchemy Core). Alembic migrations create them.

Balances in ``accounts`` are a cache of the journal: every change to them is
written together with a ``journal`` row in the same transaction, and
``SqlLedger.check`` recomputes them from the journal. The journal is
append-only (triggers refuse UPDATE and DELETE). The pool is the pseudo-account
``@pool``; its amount lives in its ``available`` column so it can be row-locked
like any account.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
)

POOL = "@pool"
TREASURY = "@treasury"  # revenue that no verified work earned (see pool.distribute)
LIMIT = 2**62  # every balance stays below this (CHECK constraints, migration 0002)

metadata = MetaData()

meta = Table(
    "ledger_meta",
    metadata,
    Column("key", String(64), primary_key=True),
    Column("value", String(512), nullable=False),
)

accounts = Table(
    "accounts",
    metadata,
    Column("id", String(128), primary_key=True),
    Column("available", BigInteger, nullable=False, default=0),
    Column("reserved", BigInteger, nullable=False, default=0),
    Column("earnings", BigInteger, nullable=False, default=0),
    Column("created_at", Float, nullable=False),
    CheckConstraint(f"available < {LIMIT}", name="available_below_limit"),
    CheckConstraint("available >= 0", name="available_not_negative"),
    CheckConstraint("reserved >= 0", name="reserved_not_negative"),
    CheckConstraint("earnings >= 0", name="earnings_not_negative"),
)

api_keys = Table(
    "api_keys",
    metadata,
    Column("key_hash", String(64), primary_key=True),  # hash_api_key(); never the key
    Column("account_id", String(128), ForeignKey("accounts.id"), nullable=False),
    Column("created_at", Float, nullable=False),
)

entries = Table(
    "entries",
    metadata,
    Column("name", String(128), primary_key=True),
    Column("created_at", Float, nullable=False),
    Column("spend_limit", BigInteger),  # the most it may reserve per period; None: no limit
    Column("period_s", Float, nullable=False, default=86400.0),
)

# One row per entry-node process: reservations carry its lease id (``incarnation``);
# recovery releases only reservations whose lease has expired (no heartbeat).
leases = Table(
    "leases",
    metadata,
    Column("lease_id", String(32), primary_key=True),
    Column("holder", String(128), nullable=False),
    Column("expires_at", Float, nullable=False),
    Column("created_at", Float, nullable=False),
)

# The ledger service's actor keys (hash_api_key of the key; never the key).
actor_keys = Table(
    "actor_keys",
    metadata,
    Column("key_hash", String(64), primary_key=True),
    Column("actor", String(128), nullable=False),
    Column("created_at", Float, nullable=False),
)

reservations = Table(
    "reservations",
    metadata,
    Column("request_id", String(128), primary_key=True),
    Column("account_id", String(128), ForeignKey("accounts.id"), nullable=False),
    Column("amount", BigInteger, nullable=False),
    Column("holder", String(128), nullable=False),  # the entry node that reserved
    Column("incarnation", String(32), nullable=False),  # that entry process's lease id
    Column("state", String(16), nullable=False),
    Column("cost", BigInteger, nullable=False, default=0),
    Column("created_at", Float, nullable=False),
    Column("closed_at", Float),
    Column("key_hash", String(64)),  # the API key (hash) that authorised the charge
    Column("max_tokens", BigInteger),  # prompt + max completion: the most it may credit
    Column("idempotency_key", String(128)),  # unique per account
    CheckConstraint("amount > 0", name="amount_positive"),
    CheckConstraint("cost >= 0 AND cost <= amount", name="cost_within_amount"),
    Index("ix_reservations_open", "state", "holder"),
)

nodes = Table(
    "nodes",
    metadata,
    Column("node_id", String(256), primary_key=True),
    Column("operator", String(128), ForeignKey("accounts.id"), nullable=False),
    Column("url", String(512), nullable=False),
    Column("manifest_hash", String(64), nullable=False),
    Column("model", String(256), nullable=False, default=""),
    Column("layers", String(32), nullable=False, default=""),
    Column("admitted", Boolean, nullable=False, default=False),
    Column("removed", Boolean, nullable=False, default=False),
    Column("served_total", BigInteger, nullable=False, default=0),
    Column("created_at", Float, nullable=False),
    Column("certificate_pem", String),  # the attested certificate it was admitted with
    Column("fingerprint", String(64)),  # its SHA-256 (hex): how receipts name the signer
    Column("admitted_until", Float, nullable=False, default=0.0),  # re-attest before this
)

# Work served: one row per node per settled request. Rows of the current epoch
# are what the next distribution pays for; the operator is recorded at the time
# of service so a node re-registered by someone else does not inherit its work.
work = Table(
    "work",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("request_id", String(128), nullable=False),
    Column("node_id", String(256), nullable=False),
    Column("operator", String(128), nullable=False),
    Column("tokens", BigInteger, nullable=False),
    Column("epoch", Integer, nullable=False),
    Column("at", Float, nullable=False),
    Column("credit", BigInteger, nullable=False, default=0),  # its share of what was paid
    Column("layers", Integer, nullable=False, default=0),  # layers its receipt proves it ran
    CheckConstraint("tokens > 0", name="tokens_positive"),
    Index("ix_work_epoch", "epoch"),
)

distributions = Table(
    "distributions",
    metadata,
    Column("epoch", Integer, primary_key=True),
    Column("at", Float, nullable=False),
    Column("pool_before", BigInteger, nullable=False),
    Column("distributed", BigInteger, nullable=False),
    Column("remainder", BigInteger, nullable=False),
    Column("tokens", BigInteger, nullable=False),
    Column("treasury", BigInteger, nullable=False, default=0),
)

journal = Table(
    "journal",
    metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("at", Float, nullable=False),
    Column("kind", String(16), nullable=False),
    Column("account_id", String(128), nullable=False),
    Column("available", BigInteger, nullable=False, default=0),
    Column("reserved", BigInteger, nullable=False, default=0),
    Column("earnings", BigInteger, nullable=False, default=0),
    Column("pool", BigInteger, nullable=False, default=0),
    Column("request_id", String(128)),
    Column("memo", String(256)),
    Index("ix_journal_account", "account_id", "seq"),
)

# The bridge to epoch settlement on chain (migration 0003, teeshard.ledger.sql.bridge).
escrow_credits = Table(
    "escrow_credits",
    metadata,
    Column("reference", String(128), primary_key=True),  # escrow:<tx hash>:<log index>
    Column("account_id", String(128), ForeignKey("accounts.id"), nullable=False),
    Column("tokens", BigInteger, nullable=False),
    Column("block", BigInteger, nullable=False),
    Column("journal_seq", Integer, nullable=False),
    Column("created_at", Float, nullable=False),
)

payout_epochs = Table(
    "payout_epochs",
    metadata,
    Column("epoch", Integer, primary_key=True, autoincrement=False),
    Column("contract", String(64), nullable=False),
    Column("total", BigInteger, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("posted_number", Integer),  # the contract's epoch number, once its root is posted
    Column("root", String(80)),
    Column("posted_at", Float),
)

payouts = Table(
    "payouts",
    metadata,
    Column("epoch", Integer, ForeignKey("payout_epochs.epoch"), primary_key=True),
    Column("account_id", String(128), ForeignKey("accounts.id"), primary_key=True),
    Column("kind", String(16), primary_key=True),  # earnings or refund
    Column("tokens", BigInteger, nullable=False),
    Column("journal_seq", Integer, nullable=False),
)

refund_requests = Table(
    "refund_requests",
    metadata,
    Column("account_id", String(128), ForeignKey("accounts.id"), primary_key=True),
    Column("requested_at", Float, nullable=False),
)
