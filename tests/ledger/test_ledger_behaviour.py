"""One behavioural suite, run against every backend (see conftest.BACKENDS)."""

from __future__ import annotations

import pytest
from ledger_harness import World
from trust_kit import KitNode, admitted, chain

from teeshard.ledger.claims import AttestedNode
from teeshard.ledger.interface import (
    DuplicateKey,
    DuplicateNode,
    DuplicateRequest,
    InsufficientBalance,
    InsufficientEarnings,
    InvalidAmount,
    ManifestMismatch,
    ReservationClosed,
    ReservationState,
    Unauthorized,
    UnknownAccount,
    UnknownNode,
    UnknownRequest,
)
from teeshard.model.layer_range import LayerRange

HASH_A = "a" * 64
HASH_B = "b" * 64


def admitted_node(world: World, node_id: str = "node-a", manifest: str = HASH_A):  # type: ignore[no-untyped-def]
    """A node serving the whole model (layers 0:2), registered and admitted with its claim."""
    operator, as_operator, _ = admitted(world, node_id, manifest, "0:2")
    return operator, as_operator


# -- accounts ------------------------------------------------------------------------


def test_deposit_balance_history(world: World) -> None:
    account, _ = world.new_account()
    world.owner.deposit(account, 700)
    world.owner.deposit(account, 300)
    balance = world.entry.balance(account)
    assert (balance.available, balance.reserved, balance.earnings) == (700 + 300, 0, 0)
    history = world.entry.history(account)
    assert [e.kind for e in history] == ["deposit", "deposit"]
    assert [e.available for e in history] == [300, 700]  # newest first
    assert world.owner.check().ok


@pytest.mark.parametrize("amount", [0, -5, 1.5, True])
def test_bad_amounts_are_refused(world: World, amount: object) -> None:
    account, _ = world.new_account(funds=100)
    with pytest.raises(InvalidAmount):
        world.owner.deposit(account, amount)  # type: ignore[arg-type]
    with pytest.raises(InvalidAmount):
        world.reserve(world.entry, "r-bad", account, amount)  # type: ignore[arg-type]
    assert world.entry.balance(account).available == 100


def test_unknown_accounts(world: World) -> None:
    with pytest.raises(UnknownAccount):
        world.entry.account_for_key("tsk_never-issued")
    unknown = world.stranger().actor  # an identity that never opened an account
    with pytest.raises(UnknownAccount):
        world.entry.balance(unknown)
    with pytest.raises(UnknownAccount):
        world.owner.deposit(unknown, 10)
    with pytest.raises(UnknownAccount):
        world.reserve(world.entry, "r-unknown", unknown, 10)


def test_api_keys_map_to_accounts_and_bind_once(world: World) -> None:
    account, as_account = world.new_account()
    as_account.add_api_key(account, "tsk_alpha")
    assert world.entry.account_for_key("tsk_alpha") == account
    other, as_other = world.new_account()
    with pytest.raises(DuplicateKey):
        as_other.add_api_key(other, "tsk_alpha")
    with pytest.raises(Unauthorized):
        world.stranger().add_api_key(account, "tsk_beta")


# -- charges -------------------------------------------------------------------------


def test_reserve_settle_moves_cost_to_pool_and_credits_nodes(world: World) -> None:
    admitted_node(world, "node-a")
    admitted_node(world, "node-b", HASH_B)
    account, _ = world.new_account(funds=1000)
    record = world.reserve(world.entry, "req-1", account, 400)
    assert record.state is ReservationState.RESERVED
    assert world.entry.balance(account).available == 600
    assert world.entry.balance(account).reserved == 400
    settled = world.entry.settle("req-1", 150, {"node-a": 42, "node-b": 42})
    assert (settled.state, settled.cost) == (ReservationState.SETTLED, 150)
    balance = world.entry.balance(account)
    assert (balance.available, balance.reserved) == (850, 0)
    assert world.entry.pool() == 150
    served = {n.node_id: n.served_tokens for n in world.entry.nodes()}
    assert served == {"node-a": 42, "node-b": 42}
    assert world.owner.check().ok


def test_release_returns_everything(world: World) -> None:
    account, _ = world.new_account(funds=500)
    world.reserve(world.entry, "req-r", account, 500)
    with pytest.raises(InsufficientBalance):
        world.reserve(world.entry, "req-r2", account, 1)
    released = world.entry.release("req-r")
    assert released.state is ReservationState.RELEASED
    assert world.entry.balance(account).available == 500
    assert world.entry.pool() == 0
    assert world.owner.check().ok


def test_insufficient_balance_is_clear(world: World) -> None:
    account, _ = world.new_account(funds=99)
    with pytest.raises(InsufficientBalance) as caught:
        world.reserve(world.entry, "req-big", account, 100)
    assert "99" in str(caught.value) and "100" in str(caught.value)
    assert world.entry.balance(account).available == 99


def test_replayed_request_ids(world: World) -> None:
    account, _ = world.new_account(funds=1000)
    first = world.reserve(world.entry, "req-dup", account, 100)
    # The same reservation replayed: the same record, nothing reserved twice.
    assert world.reserve(world.entry, "req-dup", account, 100) == first
    assert world.entry.balance(account).reserved == 100
    with pytest.raises(DuplicateRequest):
        world.reserve(world.entry, "req-dup", account, 200)  # same id, different request
    world.entry.settle("req-dup", 60, {})
    # settle replayed: a no-op; with another cost: refused; never charged twice
    assert world.entry.settle("req-dup", 60, {}).cost == 60
    with pytest.raises(DuplicateRequest):
        world.entry.settle("req-dup", 70, {})
    with pytest.raises(ReservationClosed):
        world.entry.release("req-dup")
    with pytest.raises(DuplicateRequest):
        world.reserve(world.entry, "req-dup", account, 100)  # settled ids are not reusable
    assert world.entry.balance(account).available == 940
    assert world.entry.pool() == 60
    # release replayed: a no-op; settle after release: refused
    world.reserve(world.entry, "req-rel", account, 10)
    world.entry.release("req-rel")
    world.entry.release("req-rel")
    with pytest.raises(ReservationClosed):
        world.entry.settle("req-rel", 5, {})
    assert world.entry.balance(account).available == 940
    assert world.owner.check().ok


def test_settle_checks(world: World) -> None:
    account, _ = world.new_account(funds=1000)
    with pytest.raises(UnknownRequest):
        world.entry.settle("req-none", 1, {})
    with pytest.raises(UnknownRequest):
        world.entry.release("req-none")
    world.reserve(world.entry, "req-c", account, 100)
    with pytest.raises(InvalidAmount):
        world.entry.settle("req-c", 101, {})  # more than reserved
    with pytest.raises(InvalidAmount):
        world.entry.settle("req-c", -1, {})
    with pytest.raises(InvalidAmount):
        world.entry.settle("req-c", 10, {"node-x": 0})
    with pytest.raises(UnknownNode):
        world.entry.settle("req-c", 10, {"node-x": 5})  # never registered
    operator, as_operator = world.new_account()
    pending = KitNode("node-p", HASH_A, LayerRange(0, 2))
    as_operator.register_node(pending.info(), claim=pending.claim(operator, as_operator))
    with pytest.raises(UnknownNode):
        world.entry.settle("req-c", 10, {"node-p": 5})  # registered, not admitted
    assert world.entry.reservation("req-c").state is ReservationState.RESERVED
    assert world.entry.balance(account).reserved == 100


def test_only_authorised_entries_charge(world: World) -> None:
    account, as_account = world.new_account(funds=1000)
    stranger = world.stranger()
    for ledger in (stranger, as_account):
        with pytest.raises(Unauthorized):
            world.reserve(ledger, "req-u", account, 10)
    with pytest.raises(Unauthorized):
        stranger.authorize_entry(stranger.actor)
    world.reserve(world.entry, "req-owned", account, 10)
    other_entry = world.another_entry()
    with pytest.raises(Unauthorized):
        other_entry.settle("req-owned", 5, {})  # not the entry that reserved it
    with pytest.raises(Unauthorized):
        other_entry.release("req-owned")
    with pytest.raises(Unauthorized):
        stranger.settle("req-owned", 5, {})
    assert world.entry.balance(account).reserved == 10


# -- nodes and pool ------------------------------------------------------------------


def test_only_the_operator_edits_or_removes_a_node(world: World) -> None:
    operator, as_operator, node = admitted(world, "node-e", HASH_A, "0:2")
    assert world.entry.is_operator(operator)
    intruder_name, intruder = world.new_account()
    with pytest.raises(Unauthorized):
        intruder.edit_node("node-e", url="http://evil:1")
    with pytest.raises(Unauthorized):
        intruder.remove_node("node-e")
    own_key = KitNode("node-e", HASH_A, LayerRange(0, 2))  # a claim, but by the intruder's key
    with pytest.raises(DuplicateNode):
        intruder.register_node(own_key.info(), claim=own_key.claim(intruder_name, intruder))
    with pytest.raises(Unauthorized):
        intruder.admit_node("node-e", HASH_A)  # only entry nodes or the owner admit
    edited = as_operator.edit_node("node-e", url="http://moved:9000")
    assert edited.url == "http://moved:9000"
    # SQL: a new place is not the URL that was verified, so it needs a new admission
    assert edited.admitted is (not world.sql)
    # new weights need a new admission
    assert not as_operator.edit_node("node-e", manifest_hash=HASH_B).admitted
    assert not world.entry.is_operator(operator)
    with pytest.raises(ManifestMismatch):
        world.owner.admit_node("node-e", HASH_A)
    moved = AttestedNode("http://moved:9000", node.claim(operator, world.owner))
    world.owner.admit_node("node-e", HASH_B, attested=moved)
    as_operator.remove_node("node-e")
    assert [n.node_id for n in world.entry.nodes()] == []
    assert not world.entry.is_operator(operator)
    with pytest.raises(UnknownNode):
        as_operator.edit_node("node-e", url="http://x:1")


def test_distribution_by_tokens_on_chain(world: World) -> None:
    if world.sql:
        pytest.skip("SQL pays the cost each node's receipts earned: test_ledger_revenue.py")
    # On chain the contract still splits the pool by tokens, until per-request
    # charging moves off chain (issue 9, item 7: epoch settlement, chain branch).
    op_a, _ = admitted_node(world, "node-a")
    op_b, _ = admitted_node(world, "node-b", HASH_B)
    account, _ = world.new_account(funds=10_000)
    world.reserve(world.entry, "q1", account, 1000)
    world.entry.settle("q1", 1000, {"node-a": 100, "node-b": 100})
    world.reserve(world.entry, "q2", account, 1000)
    world.entry.settle("q2", 1001 - 1, {"node-a": 100})  # node-a served 200, node-b 100
    world.reserve(world.entry, "q3", account, 1)
    world.entry.settle("q3", 1, {"node-b": 1})
    pool = world.entry.pool()
    assert pool == 2001
    result = world.entry.distribute()
    # floor(2001*200/301) = 1329, floor(2001*101/301) = 671; 1 token stays in the pool
    assert result.shares == {op_a: 1329, op_b: 671}
    assert (result.distributed, result.remainder) == (2000, 1)
    assert world.entry.pool() == 1
    assert world.entry.balance(op_a).earnings == 1329
    assert all(n.served_tokens == 0 for n in world.entry.nodes())
    # nothing served since: the next distribution keeps the pool as it is
    again = world.entry.distribute()
    assert (again.distributed, again.remainder) == (0, 1)
    assert world.owner.check().ok


def test_withdraw(world: World) -> None:
    op, as_op, node = admitted(world, "node-a", HASH_A, "0:2")
    account, _ = world.new_account(funds=500)
    world.reserve(world.entry, "w1", account, 300)
    world.entry.settle("w1", 300, {"node-a": 10}, receipts=chain("w1", [node]))
    world.entry.distribute()
    with pytest.raises(InsufficientEarnings):
        as_op.withdraw(301)
    with pytest.raises(InvalidAmount):
        as_op.withdraw(0)
    as_op.withdraw(100)
    assert as_op.balance(op).earnings == 200
    as_op.withdraw()
    assert as_op.balance(op).earnings == 0
    with pytest.raises(InvalidAmount):
        as_op.withdraw()  # nothing left
    with pytest.raises((InsufficientEarnings, UnknownAccount)):
        world.stranger().withdraw(1)
    check = world.owner.check()
    assert check.ok and (check.total_in, check.total_out) == (500, 300)


def test_removed_node_is_still_paid_for_work_served(world: World) -> None:
    op, as_op, node = admitted(world, "node-gone", HASH_A, "0:2")
    account, _ = world.new_account(funds=100)
    world.reserve(world.entry, "g1", account, 50)
    world.entry.settle("g1", 50, {"node-gone": 7}, receipts=chain("g1", [node]))
    as_op.remove_node("node-gone")
    assert world.entry.distribute().shares == {op: 50}
    assert world.entry.balance(op).earnings == 50


# -- recovery ------------------------------------------------------------------------


def test_restart_releases_the_previous_incarnations_reservations(world: World) -> None:
    account, _ = world.new_account(funds=1000)
    world.reserve(world.entry, "crash-1", account, 300)
    world.reserve(world.entry, "crash-2", account, 200)
    other = world.another_entry()
    world.reserve(other, "live-elsewhere", account, 100)
    world.expire_leases()  # the first process dies: its lease is not renewed
    other.heartbeat()  # the other entry lives on
    restarted = world.restarted_entry()
    # a new incarnation keeps what it made itself
    world.reserve(restarted, "after-restart", account, 50)
    assert sorted(restarted.recover()) == ["crash-1", "crash-2"]
    balance = world.entry.balance(account)
    assert (balance.available, balance.reserved) == (850, 150)
    assert restarted.recover() == []  # idempotent
    assert world.owner.check().ok
    with pytest.raises(Unauthorized):
        world.stranger().recover()
