"""The SQL schema comes from Alembic migrations shipped in the package; the journal is append-only."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from ledger_harness import World

from teeshard.ledger.sql.engine import current_revision, downgrade, migrate


def test_migrations_up_down_up(sql: World) -> None:
    engines = sql.owner.engines  # type: ignore[attr-defined]
    assert current_revision(engines) == "0003"
    downgrade(engines, "base")
    assert "journal" not in sa.inspect(engines.read).get_table_names()
    migrate(engines)
    assert {"accounts", "journal", "reservations", "nodes", "work"} <= set(
        sa.inspect(engines.read).get_table_names()
    )


@pytest.mark.parametrize("statement", ["UPDATE journal SET available = 0", "DELETE FROM journal"])
def test_the_journal_cannot_be_rewritten(sql: World, statement: str) -> None:
    sql.new_account(funds=10)
    engines = sql.owner.engines  # type: ignore[attr-defined]
    with pytest.raises(sa.exc.DatabaseError, match="append-only"), engines.write.begin() as conn:
        conn.exec_driver_sql(statement)
    assert sql.owner.check().ok


def test_check_catches_a_balance_changed_behind_the_journal(sql: World) -> None:
    account, _ = sql.new_account(funds=10)
    engines = sql.owner.engines  # type: ignore[attr-defined]
    with engines.write.begin() as conn:
        conn.exec_driver_sql(f"UPDATE accounts SET available = 1000 WHERE id = '{account}'")
    result = sql.owner.check()
    assert not result.ok
    assert any(account in line for line in result.mismatches)
