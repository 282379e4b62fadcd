"""The Merkle tree of settlement epochs: pure unit tests, then the contract's own check (boa)."""

from __future__ import annotations

import boa
import pytest
from eth_utils import keccak, to_checksum_address

from teeshard.ledger.evm.compile import contract_path
from teeshard.ledger.evm.merkle import (
    MerkleTree,
    leaf_hash,
    parent_hash,
    root_of,
    tree_of,
    verify,
)
from teeshard.ledger.evm.settlement import accumulate, build_epoch

CONTRACT = "0x" + "ab" * 20
WEI = 10**9


def accounts(n: int) -> list[str]:
    return [to_checksum_address(keccak(text=f"acct{i}")[:20]) for i in range(n)]


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 7, 8, 9, 33])
def test_every_leaf_proves_and_no_other_amount_does(n: int) -> None:
    amounts = {a: 10 * (i + 1) for i, a in enumerate(accounts(n))}
    tree = tree_of(CONTRACT, amounts)
    for account, amount in amounts.items():
        leaf = leaf_hash(CONTRACT, account, amount)
        proof = tree.proof(leaf)
        assert verify(tree.root, leaf, proof)
        assert len(proof) <= max(1, (n - 1).bit_length())
        # Forged: the same proof for a larger amount, or for another contract.
        assert not verify(tree.root, leaf_hash(CONTRACT, account, amount + 1), proof)
        assert not verify(tree.root, leaf_hash("0x" + "cd" * 20, account, amount), proof)


def test_a_proof_does_not_carry_over_to_another_account() -> None:
    a, b, c = accounts(3)
    tree = tree_of(CONTRACT, {a: 5, b: 6, c: 7})
    proof_a = tree.proof(leaf_hash(CONTRACT, a, 5))
    assert not verify(tree.root, leaf_hash(CONTRACT, b, 5), proof_a)
    with pytest.raises(KeyError):
        tree.proof(leaf_hash(CONTRACT, a, 6))


def test_leaves_cannot_pass_for_inner_nodes() -> None:
    """Second preimage: an inner node is keccak of 64 bytes, a leaf of 97 (0x00 || 3 words)."""
    a, b = accounts(2)
    la, lb = leaf_hash(CONTRACT, a, 1), leaf_hash(CONTRACT, b, 2)
    inner = parent_hash(la, lb)
    assert inner == keccak(min(la, lb) + max(la, lb))
    assert la != keccak(bytes(12) + bytes.fromhex(a[2:]) + (1).to_bytes(32, "big"))  # not 64 B


def test_the_root_does_not_depend_on_order_and_odd_nodes_are_promoted() -> None:
    names = accounts(5)
    one = tree_of(CONTRACT, {a: 3 for a in names})
    two = tree_of(CONTRACT, {a: 3 for a in reversed(names)})
    assert one.root == two.root
    leaves = sorted(leaf_hash(CONTRACT, a, 3) for a in names)
    assert one.levels[1][-1] == leaves[-1]  # the fifth leaf goes up unpaired
    assert root_of(leaves[0], one.proof(leaves[0])) == one.root
    with pytest.raises(ValueError):
        MerkleTree.build([])


def test_cumulative_amounts_add_up_and_bad_amounts_are_refused() -> None:
    a, b = accounts(2)
    first = accumulate({}, {a: 10, b: 0})
    assert first == {a: 10}
    assert accumulate(first, {a.lower(): 5, b: 7}) == {a: 15, b: 7}
    with pytest.raises(Exception, match="whole number"):
        accumulate({}, {a: -1})
    with pytest.raises(Exception, match="wallet address"):
        accumulate({}, {"alice": 1})
    epoch = build_epoch(CONTRACT, {a: 15, b: 7})
    assert epoch.total == 22 and epoch.root == tree_of(CONTRACT, {a: 15, b: 7}).root


def test_the_contract_accepts_exactly_the_proofs_python_builds() -> None:
    with boa.env.anchor():
        owner = boa.env.generate_address("owner")
        boa.env.set_balance(owner, 10**21)
        with boa.env.prank(owner):
            ledger = boa.load(str(contract_path()), WEI, 3600, 0, 3600)
            ledger.deposit_escrow(owner, value=1000 * WEI)
        amounts = {a: 11 * (i + 1) for i, a in enumerate(accounts(7))}
        epoch = build_epoch(ledger.address, amounts)
        with boa.env.prank(owner):
            assert ledger.post_epoch(epoch.root, epoch.total) == 0
        posted = build_epoch(ledger.address, amounts, 0)
        for account in amounts:
            item = posted.claim(account)
            with boa.reverts("invalid_proof"):
                ledger.claim(0, account, item.amount + 1, list(item.proof))
            assert ledger.claim(0, account, item.amount, list(item.proof)) == item.amount
            assert ledger.claim(0, account, item.amount, list(item.proof)) == 0  # idempotent
            assert ledger.earnings(account) == item.amount
        assert ledger.escrow() == 1000 - epoch.total
