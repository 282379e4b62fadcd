"""The contract's gaps (issue 9, item 8), each attacked on the in-process EVM and on anvil.

Each test first does what the attacker did (or what an honest party could not
do) and asserts that it now fails to succeed.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from chain_tools import RangeCap, advance, chain_world, deploy_helper, force_send, send
from eth_utils import keccak
from ledger_harness import EvmWorld

from teeshard.ledger.evm import EvmLedger
from teeshard.ledger.evm.chain import DEFAULT_ADMISSION_TIMEOUT_S, DEFAULT_REGISTRATION_BOND
from teeshard.ledger.evm.errors import TooEarly
from teeshard.ledger.evm.nodes import rebuild
from teeshard.ledger.interface import (
    InsufficientBalance,
    LedgerError,
    NodeInfo,
    ReservationState,
    Unauthorized,
    UnknownAccount,
)

HASH = "ab" * 32
MAX_NODES = 128


@pytest.fixture(params=("evm", "anvil"))
def world(request: pytest.FixtureRequest) -> Iterator[EvmWorld]:
    w = chain_world(request)
    yield w
    w.owner.close()


def _wei(world: EvmWorld, address: str) -> int:
    return int(world.chain.w3.eth.get_balance(address))  # type: ignore[attr-defined]


def _ledger(world: EvmWorld, ledger: object) -> EvmLedger:
    assert isinstance(ledger, EvmLedger)
    return ledger


def test_unspent_deposits_are_refunded_but_reserved_ones_are_not(world: EvmWorld) -> None:
    user, as_user = world.new_account(100)
    as_user = _ledger(world, as_user)
    world.entry.reserve("r-refund", user, 30)
    contract_before = _wei(world, world.address)
    with pytest.raises(InsufficientBalance):
        as_user.refund(71)  # 30 of the 100 are held by an open reservation
    entry = as_user.refund()  # all that is unspent: 70
    assert (entry.kind, entry.available) == ("refund", -70)
    assert _wei(world, world.address) == contract_before - 70 * as_user.wei_per_token()
    with pytest.raises(LedgerError, match="no unspent tokens"):
        as_user.refund()
    world.entry.settle("r-refund", 20, {})
    as_user.refund(10)
    balance = as_user.balance(user)
    assert (balance.available, balance.reserved) == (0, 0)
    check = world.owner.check()
    assert check.ok and (check.total_in, check.total_out) == (100, 80), check


def test_junk_registrations_cannot_keep_honest_operators_out(world: EvmWorld) -> None:
    honest, as_honest = world.new_account()
    ledger = _ledger(world, world.owner)
    bond_wei = DEFAULT_REGISTRATION_BOND * ledger.wei_per_token()
    spammer = deploy_helper(world.chain, "Spammer", world.address)  # type: ignore[arg-type]
    with pytest.raises(AssertionError):  # no bond, no registration
        send(world.chain, spammer.functions.spam(0, 1, 0))  # type: ignore[arg-type]
    for first in (0, MAX_NODES // 2):  # 128 junk nodes in two transactions
        count = MAX_NODES // 2
        send(world.chain, spammer.functions.spam(first, count, bond_wei), count * bond_wei)  # type: ignore[arg-type]
    assert ledger.registration_bond() == DEFAULT_REGISTRATION_BOND
    assert int(world.owner._call("bonded")) == MAX_NODES * DEFAULT_REGISTRATION_BOND  # type: ignore[attr-defined]
    honest_node = NodeInfo("honest", "http://honest:1", HASH)
    with pytest.raises(LedgerError, match="pool is full"):
        as_honest.register_node(honest_node)
    with pytest.raises(TooEarly):
        _ledger(world, as_honest).evict_node("junk-0")  # not yet: it may still be admitted
    world.owner.admit_node("junk-1", keccak(text="junk").hex())  # an admitted one stays
    advance(world.chain, DEFAULT_ADMISSION_TIMEOUT_S)  # type: ignore[arg-type]
    with pytest.raises(TooEarly):
        _ledger(world, as_honest).evict_node("junk-1")
    pool_before = world.owner.pool()
    assert _ledger(world, as_honest).evict_node("junk-0") == DEFAULT_REGISTRATION_BOND
    assert world.owner.pool() == pool_before + DEFAULT_REGISTRATION_BOND  # forfeited
    record = as_honest.register_node(honest_node)
    assert record.operator == honest
    assert "junk-0" not in {n.node_id for n in world.owner.nodes()}
    assert world.owner.check().ok


def test_removing_a_node_returns_its_bond_and_frees_the_slot_at_once(world: EvmWorld) -> None:
    _op, as_op = world.new_account()
    as_op.register_node(NodeInfo("n-bond", "http://n:1", HASH))
    before = _wei(world, world.address)
    as_op.remove_node("n-bond")
    bond_wei = DEFAULT_REGISTRATION_BOND * _ledger(world, as_op).wei_per_token()
    assert _wei(world, world.address) == before - bond_wei
    assert int(world.owner._call("node_count")) == 0  # type: ignore[attr-defined]
    as_op.register_node(NodeInfo("n-bond", "http://n:2", HASH))  # re-registered, new bond
    assert world.owner.check().ok


def test_force_sent_wei_does_not_make_check_fail(world: EvmWorld) -> None:
    user, _ = world.new_account(50)
    assert world.owner.check().ok
    force_send(world.chain, world.address, 1)  # type: ignore[arg-type]
    check = world.owner.check()
    assert check.ok, check.mismatches
    assert check.surplus_wei == 1  # type: ignore[attr-defined]
    assert world.owner.balance(user).available == 50


def test_node_state_is_rebuilt_from_events_alone(world: EvmWorld) -> None:
    _op, as_op = world.new_account()
    user, _ = world.new_account(500)
    for i, layers in enumerate(("0:4", "4:8", "8:12", "12:16")):
        as_op.register_node(NodeInfo(f"n{i}", f"http://n:{i}", HASH, "tiny", layers))
    for i in range(3):
        world.owner.admit_node(f"n{i}", HASH)
    as_op.edit_node("n1", url="http://n:11")  # same weights: still admitted
    world.entry.reserve("r-ev", user, 100)
    world.entry.settle("r-ev", 90, {"n0": 5, "n1": 7})
    as_op.remove_node("n2")
    world.owner.distribute()
    world.entry.reserve("r-ev2", user, 100)
    world.entry.settle("r-ev2", 40, {"n1": 3})
    as_op.edit_node("n0", manifest_hash="cd" * 32)  # new weights: admission lapses
    stored = world.owner.nodes()
    assert {n.node_id: n.layers for n in stored} == {"n0": "0:4", "n1": "4:8", "n3": "12:16"}
    assert rebuild(_ledger(world, world.owner)) == stored


def test_revoked_keys_and_deauthorised_entries_lose_their_power(world: EvmWorld) -> None:
    user, as_user = world.new_account(100)
    as_user.add_api_key(user, "sk-revoke-me")
    assert world.entry.account_for_key("sk-revoke-me") == user
    with pytest.raises(Unauthorized):
        _ledger(world, world.stranger()).remove_api_key(user, "sk-revoke-me")
    _ledger(world, as_user).remove_api_key(user, "sk-revoke-me")
    with pytest.raises(UnknownAccount):
        world.entry.account_for_key("sk-revoke-me")

    owner = _ledger(world, world.owner)
    with pytest.raises(Unauthorized):
        _ledger(world, world.stranger()).deauthorize_entry(world.entry.actor)
    world.entry.reserve("r-open", user, 10)
    owner.deauthorize_entry(world.entry.actor)
    assert not owner.is_entry(world.entry.actor)
    with pytest.raises(Unauthorized):
        world.entry.reserve("r-after", user, 10)
    with pytest.raises(Unauthorized):
        world.entry.settle("r-open", 5, {})
    # Its open reservation is not lost: anyone releases it once expired.
    advance(world.chain, 3600)  # type: ignore[arg-type]
    world.stranger()._transact("release", _rid("r-open"))  # type: ignore[attr-defined]
    assert world.owner.reservation("r-open").state is ReservationState.RELEASED
    assert world.owner.balance(user).available == 100


def _rid(request_id: str) -> bytes:
    from teeshard.ledger.evm.contract import chain_id_of

    return chain_id_of(request_id)


def test_ownership_moves_in_two_steps(world: EvmWorld) -> None:
    owner = _ledger(world, world.owner)
    heir = _ledger(world, world.stranger())
    mallory = _ledger(world, world.stranger())
    with pytest.raises(Unauthorized):
        mallory.transfer_ownership(mallory.actor)
    owner.transfer_ownership(heir.actor)
    assert (owner.owner(), owner.pending_owner()) == (owner.actor, heir.actor)
    owner.authorize_entry(mallory.actor)  # still the owner until the heir accepts
    with pytest.raises(Unauthorized):
        mallory.accept_ownership()
    heir.accept_ownership()
    assert (owner.owner(), owner.pending_owner()) == (heir.actor, None)
    with pytest.raises(Unauthorized):
        owner.authorize_entry(owner.actor)
    heir.deauthorize_entry(mallory.actor)
    assert not heir.is_entry(mallory.actor)


def test_recover_pages_its_scan_and_reads_each_block_once(world: EvmWorld) -> None:
    user, _ = world.new_account(1000)
    entry = _ledger(world, world.entry)
    for i in range(6):
        entry.reserve(f"r-page-{i}", user, 10)
    entry.settle("r-page-0", 5, {})
    restarted = EvmLedger(world.chain, world.address, entry.key, from_block=world.block)  # type: ignore[arg-type]
    restarted.log_page_blocks = 4
    cap = RangeCap(world.chain, 4)  # type: ignore[arg-type]
    try:
        released = restarted.recover()
        assert sorted(released) == [f"r-page-{i}" for i in range(1, 6)]
        assert len(cap.ranges) >= 3 and all(b - a < 4 for a, b in cap.ranges)
        seen = max(b for _, b in cap.ranges)
        cap.ranges.clear()
        entry.reserve("r-page-late", user, 10)
        assert restarted.recover() == ["r-page-late"]
        assert cap.ranges and min(a for a, _ in cap.ranges) > seen  # only the new blocks
        assert restarted.check().ok  # the audit pages too
    finally:
        cap.remove()
