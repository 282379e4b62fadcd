"""Issue 9 item 4: revenue is shared by what was paid, weighted by layers, never more.

The exploit, with the issue's numbers: prompt tokens at 1/20 of the price of
completion tokens. Alice pays 19,810 for ten requests (20 prompt + 1,980
completion tokens each) that carol's node serves; mallory's second account pays
3,020 for two prompt-heavy requests (30,000 prompt + 10 completion tokens) that
mallory's node serves. Split by tokens (the old rule), mallory's node took
floor(22,830 * 60,020 / 80,020) = 17,123 of the pool: a net gain of 14,103 paid
by alice. Split by what each request paid, by layers, mallory's node earns at
most what its requests paid.

SQL only: on chain the split is the epoch settlement's.
"""

from __future__ import annotations

import pytest
from ledger_harness import World
from trust_kit import admitted, chain, entry_stage

from teeshard.ledger.interface import TREASURY
from teeshard.ledger.pricing import ModelPrice, Usage
from teeshard.model.layer_range import LayerRange

PRICE = ModelPrice(prompt_per_1k=50, completion_per_1k=1000)  # prompt at 1/20
ALICE = Usage(20, 1980)  # costs 1,981
SOCK = Usage(30_000, 10)  # costs 1,510: prompt-heavy, cheap, many tokens
ENTRY = entry_stage(LayerRange(0, 1))  # the entry node's own stage, not registered


def old_split(pool: int, tokens: dict[str, int]) -> dict[str, int]:
    """The rule the ledger had: the pool by tokens served (kept to show the exploit)."""
    total = sum(tokens.values())
    return {node: pool * t // total for node, t in tokens.items()}


def test_the_prompt_heavy_exploit_no_longer_pays(sql: World) -> None:
    carol, _, carols = admitted(sql, "carol-node", "c" * 64, "1:2")
    mallory, _, mallorys = admitted(sql, "mallory-node", "d" * 64, "1:2")  # a replica
    alice, _ = sql.new_account(funds=100_000)
    sock, _ = sql.new_account(funds=100_000)  # mallory's second account
    paid = {alice: 0, sock: 0}
    tokens = {"carol-node": 0, "mallory-node": 0}
    for i, (account, usage, node, count) in enumerate(
        [(alice, ALICE, carols, 10), (sock, SOCK, mallorys, 2)]
    ):
        for j in range(count):
            rid = f"r{i}-{j}"
            cost = PRICE.cost(usage)
            n = usage.prompt_tokens + usage.completion_tokens
            sql.reserve(sql.entry, rid, account, cost, max_tokens=n)
            sql.entry.settle(rid, cost, {node.node_id: n}, receipts=chain(rid, [ENTRY, node]))
            paid[account] += cost
            tokens[node.node_id] += n
    assert (paid[alice], paid[sock]) == (19_810, 3_020)
    # The old rule, on these very numbers: mallory's node takes 17,123 of 22,830.
    old = old_split(sql.entry.pool(), tokens)
    assert old["mallory-node"] == 17_123 and old["mallory-node"] - paid[sock] == 14_103
    result = sql.entry.distribute()
    # Now: each node earns its layers' share (1 of 2) of what its requests paid.
    assert result.shares == {carol: 10 * (1981 // 2), mallory: 2 * (1510 // 2)}
    assert result.shares[mallory] <= paid[sock]  # a net loss for mallory
    assert result.treasury == 22_830 - 9_900 - 1_510  # the entry's layer, and rounding
    assert sql.owner.balance(TREASURY).earnings == result.treasury
    assert sql.entry.pool() == 0
    assert sql.owner.check().ok


def test_each_node_earns_by_the_layers_it_ran(sql: World) -> None:
    op_a, _, a = admitted(sql, "node-a", "a" * 64, "0:1")
    op_b, _, b = admitted(sql, "node-b", "b" * 64, "1:4")
    account, _ = sql.new_account(funds=1000)
    sql.reserve(sql.entry, "q", account, 400)
    # The attack: every node of a chain got full credit whatever layers it ran.
    sql.entry.settle("q", 400, {"node-a": 9, "node-b": 9}, receipts=chain("q", [a, b]))
    assert {n.node_id: n.earned for n in sql.entry.nodes()} == {"node-a": 100, "node-b": 300}
    assert sql.entry.distribute().shares == {op_a: 100, op_b: 300}


def test_revenue_with_no_credited_work_goes_to_the_treasury(sql: World) -> None:
    account, _ = sql.new_account(funds=10_000)
    sql.reserve(sql.entry, "u", account, 5000)
    sql.entry.settle("u", 5000, {})  # no node proved any work
    op, _, node = admitted(sql, "late-node", "e" * 64, "0:2")
    sql.reserve(sql.entry, "w", account, 1)
    sql.entry.settle("w", 1, {"late-node": 1}, receipts=chain("w", [node]))
    result = sql.entry.distribute()
    # The attack: the first node credited after 5,000 of uncredited revenue took 5,001.
    assert result.shares == {op: 1}
    assert (result.treasury, sql.owner.balance(TREASURY).earnings) == (5000, 5000)
    paid_out = sql.owner.withdraw_treasury()  # type: ignore[attr-defined]
    assert paid_out.earnings == -5000
    with pytest.raises(Exception, match="owner"):
        sql.entry.withdraw_treasury()  # type: ignore[attr-defined]
    assert sql.owner.check().ok
