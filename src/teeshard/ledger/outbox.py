"""A durable outbox for settle and release: written before the ledger call, retried until done.

One transient ledger failure (a dropped connection, a restarting database, a
chain node that does not answer) must not leave a reservation locked until the
entry node restarts, nor lose a charge. So ``LedgerBilling`` writes each settle
and release here first (a small SQLite file of the entry node's own), calls the
ledger, and deletes the item when the ledger has taken it; otherwise its
maintenance thread retries it, with the same request id (settle and release are
idempotent by request id, so a retry never charges twice), after a restart too.

What is stored: request ids, costs, node ids, token counts and receipts (hashes
and signatures): no key, prompt or completion.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from teeshard.attest.errors import AttestationError
from teeshard.attest.receipts import Receipt, receipts_from_json, receipts_to_json

log = logging.getLogger(__name__)

Kind = Literal["settle", "release"]


@dataclass(frozen=True)
class OutboxItem:
    kind: Kind
    request_id: str
    cost: int = 0
    served: Mapping[str, int] = field(default_factory=dict)
    receipts: Sequence[Receipt] = ()
    attempts: int = 0


class Outbox:
    """Items by request id in a SQLite file (``None``: in memory, for tests and tools)."""

    def __init__(self, path: str | Path | None = None) -> None:
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(
            str(path) if path is not None else ":memory:", check_same_thread=False
        )
        self._lock = threading.Lock()
        with self._lock, self._db:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS outbox (request_id TEXT PRIMARY KEY, kind TEXT NOT "
                "NULL, body TEXT NOT NULL, attempts INTEGER NOT NULL, at REAL NOT NULL) STRICT"
            )

    def put(self, item: OutboxItem) -> None:
        body = json.dumps(
            {
                "cost": item.cost,
                "served": dict(item.served),
                "receipts": receipts_to_json(item.receipts),
            }
        )
        with self._lock, self._db:
            self._db.execute(
                "INSERT OR REPLACE INTO outbox VALUES (?, ?, ?, ?, ?)",
                (item.request_id, item.kind, body, item.attempts, time.time()),
            )

    def failed(self, request_id: str) -> None:
        with self._lock, self._db:
            self._db.execute(
                "UPDATE outbox SET attempts = attempts + 1 WHERE request_id = ?", (request_id,)
            )

    def done(self, request_id: str) -> None:
        with self._lock, self._db:
            self._db.execute("DELETE FROM outbox WHERE request_id = ?", (request_id,))

    def pending(self) -> list[OutboxItem]:
        with self._lock:
            rows = self._db.execute(
                "SELECT request_id, kind, body, attempts FROM outbox ORDER BY at"
            ).fetchall()
        items = []
        for request_id, kind, body, attempts in rows:
            data = json.loads(body)
            try:
                receipts = receipts_from_json(data["receipts"])
            except AttestationError:  # written by a version with another receipt format
                log.warning("request %s: its receipts no longer parse; settled without", request_id)
                receipts = []
            items.append(
                OutboxItem(
                    kind,
                    request_id,
                    int(data["cost"]),
                    {str(k): int(v) for k, v in data["served"].items()},
                    receipts,
                    int(attempts),
                )
            )
        return items

    def close(self) -> None:
        with self._lock:
            self._db.close()
