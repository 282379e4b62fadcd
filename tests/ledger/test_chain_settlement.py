"""Epoch settlement on chain (issue 9, item 7), on the in-process EVM and on anvil.

Users escrow tokens on chain, the SQL ledger charges each request, and once an
epoch the settler posts a Merkle root of cumulative amounts payable per
account; anyone claims with a proof. The attacks: a forged or borrowed proof, a
claim replayed, a stranger posting a root, a root promising more than was
escrowed, and a dishonest settler posting trees that together promise more.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from chain_tools import chain_world
from ledger_harness import EvmWorld

from teeshard.ledger.evm import EvmLedger
from teeshard.ledger.evm.errors import InvalidProof, UnknownEpoch
from teeshard.ledger.evm.settlement import (
    Claim,
    EpochSettler,
    build_epoch,
    claim,
    deposit_escrow,
    escrow_deposits,
)
from teeshard.ledger.interface import InsufficientBalance, Unauthorized


@pytest.fixture(params=("evm", "anvil"))
def world(request: pytest.FixtureRequest) -> Iterator[EvmWorld]:
    w = chain_world(request)
    yield w
    w.owner.close()


def _as(ledger: object) -> EvmLedger:
    assert isinstance(ledger, EvmLedger)
    return ledger


def _settler(world: EvmWorld, store: Path | None = None) -> EpochSettler:
    key = _as(world.stranger())
    _as(world.owner).authorize_settler(key.actor)
    return EpochSettler(key, store)


def test_epochs_pay_cumulative_amounts_once(world: EvmWorld, tmp_path: Path) -> None:
    alice, as_alice = world.new_account()
    op_a, as_op_a = world.new_account()
    op_b, _ = world.new_account()
    deposit_escrow(_as(as_alice), alice, 1000)  # spent off chain from here on
    (seen,) = escrow_deposits(_as(world.owner), world.block)  # what the SQL ledger credits
    assert (seen.account, seen.tokens) == (alice, 1000)
    settler = _settler(world, tmp_path)
    first = settler.settle({op_a: 300, op_b: 200})
    assert (first.number, first.total) == (0, 500)
    anyone = _as(world.stranger())
    assert claim(anyone, first.claim(op_a)) == 300  # anyone may send it; op_a is credited
    assert world.owner.balance(op_a).earnings == 300
    assert claim(anyone, first.claim(op_a)) == 0  # replayed: nothing more
    assert settler.settle({}) == first  # nothing new: nothing posted
    assert int(world.owner._call("epochs_posted")) == 1  # type: ignore[attr-defined]
    second = settler.settle({op_a: 100, alice: 400})  # alice's unspent 400 refunded
    assert second.amounts == {op_a: 400, op_b: 200, alice: 400}
    assert claim(anyone, second.claim(op_a)) == 100  # only what the new epoch adds
    assert claim(anyone, first.claim(op_a)) == 0  # an older, smaller amount pays nothing
    assert settler.claim(op_b, 0) == 200 and settler.claim(op_b) == 0  # caught up late
    assert settler.claim(alice) == 400
    entry = _as(as_op_a).withdraw()
    assert entry.earnings == -400
    assert int(world.owner._call("escrow")) == 0  # type: ignore[attr-defined]
    check = world.owner.check()
    assert check.ok and (check.total_in, check.total_out) == (1000, 400), check
    reopened = EpochSettler(_as(world.stranger()), tmp_path)  # proofs survive a restart
    assert reopened.latest() == second and reopened.cumulative() == second.amounts


def test_forged_and_borrowed_proofs_are_refused(world: EvmWorld) -> None:
    alice, as_alice = world.new_account()
    op_a, _ = world.new_account()
    mallory, _ = world.new_account()
    deposit_escrow(_as(as_alice), alice, 1000)
    epoch = _settler(world).settle({op_a: 300, alice: 100})
    real = epoch.claim(op_a)
    anyone = _as(world.stranger())
    for forged in (
        Claim(real.epoch, op_a, 900, real.proof),  # more than the tree says
        Claim(real.epoch, mallory, 300, real.proof),  # op_a's proof for mallory
        Claim(real.epoch, op_a, 300, ()),  # no proof
        Claim(real.epoch, op_a, 300, (*real.proof[:-1], b"\x00" * 32)),
    ):
        with pytest.raises(InvalidProof):
            claim(anyone, forged)
    with pytest.raises(UnknownEpoch):
        claim(anyone, Claim(7, op_a, 300, real.proof))
    other = build_epoch("0x" + "12" * 20, epoch.amounts, 0)  # a tree for another contract
    with pytest.raises(InvalidProof):
        claim(anyone, other.claim(op_a))
    assert world.owner.balance(op_a).earnings == 0
    assert world.owner.check().ok


def test_only_settlers_post_and_only_what_was_escrowed(world: EvmWorld) -> None:
    alice, as_alice = world.new_account()
    op_a, _ = world.new_account()
    deposit_escrow(_as(as_alice), alice, 500)
    with pytest.raises(Unauthorized):
        EpochSettler(_as(world.stranger())).settle({op_a: 10})
    settler = _settler(world)
    with pytest.raises(InsufficientBalance):
        settler.settle({op_a: 501})
    unbacked = build_epoch(world.address, {op_a: 501})  # the contract refuses it too
    with pytest.raises(InsufficientBalance):
        settler.ledger._transact("post_epoch", unbacked.root, unbacked.total)
    settler.settle({op_a: 400})
    _as(world.owner).authorize_settler(settler.ledger.actor, False)
    with pytest.raises(Unauthorized):
        settler.settle({op_a: 1})


def test_a_dishonest_settler_cannot_pay_out_more_than_the_escrow(world: EvmWorld) -> None:
    alice, as_alice = world.new_account()
    _, as_bob = world.new_account(300)  # per-request money, outside the escrow
    op_a, _ = world.new_account()
    op_b, _ = world.new_account()
    deposit_escrow(_as(as_alice), alice, 1000)
    settler = _settler(world)
    # Two trees each within the escrow, together twice over it.
    first = settler.settle({op_a: 1000})
    second = build_epoch(world.address, {op_b: 1000})
    settler.ledger._transact("post_epoch", second.root, second.total)
    anyone = _as(world.stranger())
    assert claim(anyone, first.claim(op_a)) == 1000
    with pytest.raises(InsufficientBalance):
        claim(anyone, build_epoch(world.address, {op_b: 1000}, 1).claim(op_b))
    assert _as(as_bob).refund().available == -300  # bob's deposit is untouched
    assert world.owner.check().ok


def test_a_crash_between_posting_and_saving_loses_no_epoch(world: EvmWorld, tmp_path: Path) -> None:
    alice, as_alice = world.new_account()
    op_a, _ = world.new_account()
    deposit_escrow(_as(as_alice), alice, 100)
    settler = _settler(world, tmp_path)
    epoch = build_epoch(world.address, {op_a: 60})
    settler._write("epoch-pending", epoch)  # written, then the root posted, then a crash
    settler.ledger._transact("post_epoch", epoch.root, epoch.total)
    reopened = EpochSettler(settler.ledger, tmp_path)
    assert reopened.latest() is not None and reopened.latest().number == 0  # type: ignore[union-attr]
    retried = EpochSettler(settler.ledger)  # no store: the retry finds its root on chain
    assert retried.settle({op_a: 60}).number == 0
    assert int(world.owner._call("epochs_posted")) == 1  # type: ignore[attr-defined]
    assert reopened.claim(op_a) == 60
    assert not (tmp_path / "epoch-pending.json").exists()
