"""The console's read model of the ledger: usage rows and pending payouts (pure)."""

from __future__ import annotations

from teeshard.entry.console_ledger import pending_payouts, usage_rows
from teeshard.ledger.interface import JournalEntry, NodeRecord


def entry(seq: int, kind: str, request: str | None, available: int, reserved: int) -> JournalEntry:
    return JournalEntry(seq, float(seq), kind, "alice", available, reserved, request_id=request)


def node(node_id: str, served: int, admitted: bool = True) -> NodeRecord:
    return NodeRecord(node_id, "op", "https://x", "0" * 64, "m", "0:1", admitted, served, served)


def test_usage_rows_fold_each_request_into_one_row_with_its_cost() -> None:
    rows = usage_rows(
        [
            entry(1, "deposit", None, 1000, 0),
            entry(2, "reserve", "r1", -300, 300),
            entry(3, "settle", "r1", 300 - 42, -300),  # charged 42, the rest returned
            entry(4, "reserve", "r2", -100, 100),
            entry(5, "release", "r2", 100, -100),
            entry(6, "reserve", "r3", -50, 50),  # still open
        ]
    )
    assert [(r.request_id, r.state, r.reserved, r.cost) for r in rows] == [
        ("r3", "reserved", 50, 0),
        ("r2", "released", 100, 0),
        ("r1", "settled", 300, 42),
    ]


def test_usage_rows_ignore_a_settlement_without_its_reservation_in_view() -> None:
    # history is limited: the reserve entry may be cut off; no row is invented then
    assert usage_rows([entry(9, "settle", "old", 10, -20)]) == []


def test_pending_payouts_split_the_pool_by_work_rounding_down() -> None:
    nodes = [node("a", 2), node("b", 1), node("c", 5, admitted=False), node("d", 0)]
    payouts = pending_payouts(nodes, 100)
    assert payouts == {"a": 66, "b": 33, "c": 0, "d": 0}  # 1 stays in the pool
    assert sum(payouts.values()) <= 100


def test_pending_payouts_with_no_work_or_no_pool_are_zero() -> None:
    assert pending_payouts([node("a", 0)], 100) == {"a": 0}
    assert pending_payouts([node("a", 3)], 0) == {"a": 0}
