"""The SQL ledger's audit: every balance recomputed from the journal, in one snapshot.

Sums are Python integers (arbitrary precision): SQLite's ``SUM`` of 64-bit
integers overflows and PostgreSQL's would be NUMERIC, so the journal is read row
by row and added here. The caller runs this in one snapshot (REPEATABLE READ on
PostgreSQL, one read transaction under WAL on SQLite): concurrent charges can
then never make a consistent ledger look inconsistent.
"""

from __future__ import annotations

from sqlalchemy import Connection, select

from teeshard.ledger.interface import Consistency
from teeshard.ledger.sql.schema import (
    LIMIT,
    POOL,
    accounts,
    escrow_credits,
    journal,
    payouts,
    reservations,
)


def check(conn: Connection) -> Consistency:
    derived: dict[str, list[int]] = {}
    total_in = total_out = 0
    for account, kind, available, reserved, earnings, pool in conn.execute(
        select(
            journal.c.account_id,
            journal.c.kind,
            journal.c.available,
            journal.c.reserved,
            journal.c.earnings,
            journal.c.pool,
        )
    ):
        sums = derived.setdefault(account, [0, 0, 0, 0])
        for i, value in enumerate((available, reserved, earnings, pool)):
            sums[i] += int(value)
        if kind in ("deposit", "escrow"):
            total_in += int(available)
        elif kind == "withdraw":
            total_out -= int(earnings)
        elif kind == "payout":  # paid on chain: earnings, or a refund of unspent tokens
            total_out -= int(available) + int(earnings)
    open_reserved: dict[str, int] = {}
    for account, amount in conn.execute(
        select(reservations.c.account_id, reservations.c.amount).where(
            reservations.c.state == "reserved"
        )
    ):
        open_reserved[account] = open_reserved.get(account, 0) + int(amount)
    mismatches: list[str] = []
    held = 0
    stored_rows = conn.execute(select(accounts)).all()
    for row in stored_rows:
        if not all(isinstance(v, int) for v in (row.available, row.reserved, row.earnings)):
            mismatches.append(f"{row.id}: a balance is not an integer")
            continue
        s = derived.get(row.id, [0, 0, 0, 0])
        if row.id == POOL:
            want, stored = (s[3], 0, 0), (row.available, 0, 0)
        else:
            want, stored = (s[0], s[1], s[2]), (row.available, row.reserved, row.earnings)
            if open_reserved.get(row.id, 0) != row.reserved:
                mismatches.append(
                    f"{row.id}: reserved {row.reserved} but open reservations hold "
                    f"{open_reserved.get(row.id, 0)}"
                )
        if want != stored or min(stored) < 0 or max(stored) >= LIMIT:
            mismatches.append(f"{row.id}: stored {stored}, journal says {want}")
        held += sum(stored)
    mismatches.extend(_bridge_mismatches(conn))
    if held != total_in - total_out:
        mismatches.append(f"held {held} != deposits {total_in} - withdrawals {total_out}")
    return Consistency(
        not mismatches, len(stored_rows), tuple(mismatches), total_in, total_out, held
    )


def _bridge_mismatches(conn: Connection) -> list[str]:
    """Escrow credits and payouts each match their journal row (kind, account, amount)."""
    rows = {
        int(r.seq): (r.kind, r.account_id, int(r.available), int(r.earnings))
        for r in conn.execute(
            select(journal.c.seq, journal.c.kind, journal.c.account_id, journal.c.available,
                   journal.c.earnings).where(journal.c.kind.in_(("escrow", "payout")))
        )
    }  # fmt: skip
    claimed: set[int] = set()
    out = []
    for ref, account, tokens, seq in conn.execute(
        select(escrow_credits.c.reference, escrow_credits.c.account_id, escrow_credits.c.tokens,
               escrow_credits.c.journal_seq)
    ):  # fmt: skip
        if rows.get(int(seq)) != ("escrow", account, int(tokens), 0):
            out.append(f"escrow credit {ref}: no matching journal entry")
        claimed.add(int(seq))
    for epoch, account, kind, tokens, seq in conn.execute(
        select(payouts.c.epoch, payouts.c.account_id, payouts.c.kind, payouts.c.tokens,
               payouts.c.journal_seq)
    ):  # fmt: skip
        want = (-int(tokens), 0) if kind == "refund" else (0, -int(tokens))
        if rows.get(int(seq)) != ("payout", account, *want):
            out.append(f"payout of epoch {epoch} to {account}: no matching journal entry")
        claimed.add(int(seq))
    out.extend(
        f"journal entry {seq} ({rows[seq][0]}) has no record" for seq in rows.keys() - claimed
    )
    return out
