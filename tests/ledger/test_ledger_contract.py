"""The Vyper contract's own logic, on titanoboa: roles, events, rounding, reentrancy, expiry."""

from __future__ import annotations

from pathlib import Path

import boa
import pytest
from eth_utils import keccak

from teeshard.ledger.evm.compile import EVM_VERSION, contract_path, source

WEI = 10**9
TIMEOUT = 3600
HASH = b"\x11" * 32


def node_key(name: str) -> bytes:
    return keccak(text=name)


@pytest.fixture
def env():  # type: ignore[no-untyped-def]
    with boa.env.anchor():  # every test starts from the same empty chain
        owner, entry, user, op = (boa.env.generate_address(n) for n in ("o", "e", "u", "p"))
        for who in (owner, entry, user, op):
            boa.env.set_balance(who, 10**21)
        with boa.env.prank(owner):
            ledger = boa.load(
                str(contract_path()), WEI, TIMEOUT, 0, TIMEOUT
            )  # no bond: see test_chain_*
            ledger.authorize_entry(entry, True)
        with boa.env.prank(user):
            ledger.open_account()
        yield ledger, owner, entry, user, op


def test_evm_version_is_explicit() -> None:
    assert EVM_VERSION == "cancun"
    assert "# pragma evm-version cancun" in source()


def test_deposit_needs_whole_tokens_and_an_open_account(env) -> None:  # type: ignore[no-untyped-def]
    ledger, _, _, user, op = env
    with boa.env.prank(user):
        ledger.deposit(user, value=5 * WEI)
        with boa.reverts("invalid_amount"):
            ledger.deposit(user, value=5 * WEI + 1)  # no dust taken
        with boa.reverts("invalid_amount"):
            ledger.deposit(user, value=0)
        with boa.reverts("unknown_account"):
            ledger.deposit(op, value=WEI)
        ledger.deposit(user, value=2 * WEI)
        (event,) = ledger.get_logs(strict=False)
    assert (type(event).__name__, event.tokens, event.value) == ("Deposited", 2, 2 * WEI)
    assert ledger.available(user) == 7


def test_only_entries_charge_and_only_holders_settle(env) -> None:  # type: ignore[no-untyped-def]
    ledger, owner, entry, user, _ = env
    with boa.env.prank(user):
        ledger.deposit(user, value=100 * WEI)
    rid = keccak(text="r1")
    for who in (user, owner):
        with boa.env.prank(who), boa.reverts("unauthorized"):
            ledger.reserve(rid, user, 10, "r1")
    with boa.env.prank(entry):
        ledger.reserve(rid, user, 10, "r1")
        with boa.reverts("duplicate_request"):
            ledger.reserve(rid, user, 10, "r1")
        with boa.reverts("insufficient_balance"):
            ledger.reserve(keccak(text="r2"), user, 91, "r2")
    with boa.env.prank(user), boa.reverts("unauthorized"):
        ledger.settle(rid, 5, [], [])
    with boa.env.prank(user), boa.reverts("unauthorized"):
        ledger.release(rid)  # not the holder, not expired
    with boa.env.prank(entry):
        ledger.settle(rid, 5, [], [])
        ledger.settle(rid, 5, [], [])  # replay: no-op
        with boa.reverts("duplicate_request"):
            ledger.settle(rid, 6, [], [])
    assert (ledger.available(user), ledger.reserved(user), ledger.pool()) == (95, 0, 5)


def test_anyone_may_release_an_expired_reservation(env) -> None:  # type: ignore[no-untyped-def]
    ledger, _, entry, user, op = env
    with boa.env.prank(user):
        ledger.deposit(user, value=10 * WEI)
    rid = keccak(text="stale")
    with boa.env.prank(entry):
        ledger.reserve(rid, user, 10, "stale")
    boa.env.time_travel(seconds=TIMEOUT)
    with boa.env.prank(op):
        ledger.release(rid)
    assert (ledger.available(user), ledger.reserved(user)) == (10, 0)


def test_node_roles_and_events(env) -> None:  # type: ignore[no-untyped-def]
    ledger, _, entry, user, op = env
    with boa.env.prank(op):
        with boa.reverts("unknown_account"):
            ledger.register_node("n1", "http://n1", HASH, "m", "0:2")
        ledger.open_account()
        ledger.register_node("n1", "http://n1", HASH, "m", "0:2")
        (event,) = ledger.get_logs(strict=False)
    assert type(event).__name__ == "NodeRegistered"
    assert (event.name, event.url, event.manifest_hash) == ("n1", "http://n1", HASH)
    with boa.env.prank(user):
        with boa.reverts("duplicate_node"):
            ledger.register_node("n1", "http://evil", HASH, "", "")
        with boa.reverts("unauthorized"):
            ledger.edit_node(node_key("n1"), "http://evil", HASH)
        with boa.reverts("unauthorized"):
            ledger.remove_node(node_key("n1"))
        with boa.reverts("unauthorized"):
            ledger.admit_node(node_key("n1"), HASH)
    with boa.env.prank(entry):
        with boa.reverts("manifest_mismatch"):
            ledger.admit_node(node_key("n1"), b"\x22" * 32)
        ledger.admit_node(node_key("n1"), HASH)
    assert ledger.is_operator(op)
    with boa.env.prank(op):
        ledger.edit_node(node_key("n1"), "http://n1b", b"\x22" * 32)
    assert not ledger.is_operator(op)  # new weights: admission lapsed


def _served_pool(ledger, entry, user, op, served: list[tuple[str, int]], cost: int):  # type: ignore[no-untyped-def]
    with boa.env.prank(op):
        ledger.open_account()
        for name, _ in served:
            ledger.register_node(name, f"http://{name}", HASH, "", "")
    with boa.env.prank(entry):
        for name, _ in served:
            ledger.admit_node(node_key(name), HASH)
    with boa.env.prank(user):
        ledger.deposit(user, value=cost * WEI)
    with boa.env.prank(entry):
        ledger.reserve(keccak(text="x"), user, cost, "x")
        ledger.settle(
            keccak(text="x"), cost, [node_key(n) for n, _ in served], [t for _, t in served]
        )


def test_distribution_rounds_down_and_keeps_the_remainder(env) -> None:  # type: ignore[no-untyped-def]
    ledger, _, entry, user, op = env
    _served_pool(ledger, entry, user, op, [("a", 1), ("b", 1), ("c", 1)], cost=100)
    ledger.distribute()
    events = [type(e).__name__ for e in ledger.get_logs(strict=False)]
    assert events == ["Paid", "Paid", "Paid", "Distributed"]
    assert ledger.earnings(op) == 99  # 3 x floor(100/3)
    assert ledger.pool() == 1  # the remainder waits for the next distribution
    assert ledger.total_served() == 0


def test_withdraw_blocks_reentry_and_pays_once(env) -> None:  # type: ignore[no-untyped-def]
    ledger, owner, entry, user, _ = env
    attacker = boa.load(str(Path(__file__).with_name("contracts") / "Reenter.vy"), ledger.address)
    attacker.join(HASH)
    with boa.env.prank(owner):
        ledger.admit_node(node_key("evil"), HASH)
    with boa.env.prank(user):
        ledger.deposit(user, value=100 * WEI)
    with boa.env.prank(entry):
        ledger.reserve(keccak(text="q"), user, 100, "q")
        ledger.settle(keccak(text="q"), 100, [node_key("evil")], [5])
    ledger.distribute()
    assert ledger.earnings(attacker.address) == 100
    before = boa.env.get_balance(ledger.address)
    attacker.attack(60)
    assert attacker.reentry_tried() and not attacker.reentry_succeeded()
    assert attacker.received() == 60 * WEI  # paid once
    assert ledger.earnings(attacker.address) == 40
    assert boa.env.get_balance(ledger.address) == before - 60 * WEI
    with boa.reverts("insufficient_earnings"):
        attacker.attack(41)
    assert ledger.total_withdrawn() == 60
