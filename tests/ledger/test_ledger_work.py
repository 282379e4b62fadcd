"""The pure core of work credit: receipts that prove work, and the split of what was paid."""

from __future__ import annotations

from dataclasses import replace

import pytest
from trust_kit import KitNode, chain, entry_stage

from teeshard.ledger.interface import UnverifiedWork
from teeshard.ledger.work import AttestedSigner, credits_for, split_cost, verified_layers
from teeshard.model.layer_range import LayerRange

A = KitNode("a", "a" * 64, LayerRange(1, 3))
B = KitNode("b", "b" * 64, LayerRange(3, 4))
ENTRY = entry_stage(LayerRange(0, 1))


def signers(*nodes: KitNode) -> dict[bytes, AttestedSigner]:
    return {
        n.identity.fingerprint: AttestedSigner(
            n.node_id, n.identity.certificate_pem, n.manifest, str(n.layers)
        )
        for n in nodes
    }


def test_layers_come_from_verified_receipts_only() -> None:
    receipts = chain("r", [ENTRY, A, B])
    assert verified_layers("r", receipts, signers(A, B)) == ({"a": 2, "b": 1}, 4)
    assert verified_layers("r", receipts, signers(B)) == ({"b": 1}, 4)  # a is unknown here


def test_split_rounds_down_and_never_pays_more_than_the_cost() -> None:
    credits = split_cost(10, {"a": 2, "b": 1}, 4)
    assert [(c.node_id, c.credit) for c in credits] == [("a", 5), ("b", 2)]
    assert sum(c.credit for c in credits) <= 10
    assert split_cost(0, {"a": 2}, 4) == []
    with pytest.raises(UnverifiedWork):
        split_cost(10, {"a": 3, "b": 2}, 4)  # more layers than the chain has


@pytest.mark.parametrize(
    "spoil, reason",
    [
        (lambda r: [r[0], r[2], r[1]], "out of order"),
        (lambda r: [r[0], replace(r[1], layers=LayerRange(1, 4)), r[2]], "does not verify"),
        (lambda r: [r[0], replace(r[1], signature=r[2].signature), r[2]], "does not verify"),
        (lambda r: [r[0], r[1], replace(r[2], previous_hash=bytes(32))], "not linked"),
        (lambda r: [r[1], r[2]], "out of order|do not start"),
    ],
)
def test_a_spoiled_chain_is_refused(spoil: object, reason: str) -> None:
    receipts = spoil(chain("r", [ENTRY, A, B]))  # type: ignore[operator]
    with pytest.raises(UnverifiedWork, match=reason):
        verified_layers("r", receipts, signers(A, B))


def test_only_nodes_named_as_serving_are_credited() -> None:
    receipts = chain("r", [ENTRY, A, B])
    credits = credits_for("r", 8, ["b"], receipts, signers(A, B))
    assert [(c.node_id, c.layers, c.credit) for c in credits] == [("b", 1, 2)]
    with pytest.raises(UnverifiedWork, match="another request"):
        credits_for("other", 8, ["a"], receipts, signers(A))
