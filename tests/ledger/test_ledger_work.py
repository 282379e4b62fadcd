"""The pure core of work credit: receipts that prove work, and the split of what was paid.

The attacks come first: an entry node that settles a request holds every receipt
of it and may spoil, replay, splice, truncate or reorder them; none of that may
credit a node more than it signed for, nor more in all than the request paid.
"""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
from trust_kit import KitNode, chain, entry_stage

from teeshard.attest.receipts import Receipt
from teeshard.ledger.interface import UnverifiedWork
from teeshard.ledger.work import (
    AttestedSigner,
    ProvenWork,
    credits_for,
    proven_work,
    segments_of,
    split_cost,
)
from teeshard.model.layer_range import LayerRange

A = KitNode("a", "a" * 64, LayerRange(1, 3))
B = KitNode("b", "b" * 64, LayerRange(3, 4))
C = KitNode("c", "c" * 64, LayerRange(3, 4))  # B's replica
ENTRY = entry_stage(LayerRange(0, 1))


def signers(*nodes: KitNode) -> dict[bytes, AttestedSigner]:
    return {
        n.identity.fingerprint: AttestedSigner(
            n.node_id, n.identity.certificate_pem, n.manifest, str(n.layers)
        )
        for n in nodes
    }


def failed_over(request_id: str = "r") -> list[Receipt]:
    """B served positions [0, 10) and died; C took over and the answer ended at 40.

    The first segment is the stages that could still sign (entry and A: B is gone);
    the second is the whole replacement route, which recomputed [0, 10) and ran on.
    """
    return chain(request_id, [ENTRY, A], 10, model_layers=4) + chain(request_id, [ENTRY, A, C], 40)


def shares(credits: list) -> dict[str, tuple[int, int]]:  # type: ignore[type-arg]
    return {c.node_id: (c.positions, c.credit) for c in credits}


def test_layers_come_from_verified_receipts_only() -> None:
    receipts = chain("r", [ENTRY, A, B])
    work = proven_work("r", receipts, signers(A, B))
    assert (dict(work.layers), work.model_layers, work.total_positions) == (
        {"a": 2, "b": 1}, 4, 10,
    )  # fmt: skip
    assert dict(proven_work("r", receipts, signers(B)).layers) == {"b": 1}  # a is unknown here


def test_split_rounds_down_and_never_pays_more_than_the_cost() -> None:
    work = proven_work("r", chain("r", [ENTRY, A, B]), signers(A, B))
    credits = split_cost(10, work)
    assert [(c.node_id, c.credit) for c in credits] == [("a", 5), ("b", 2)]
    assert split_cost(0, work) == []
    with pytest.raises(UnverifiedWork):  # the guard: more layer-positions than the request had
        split_cost(10, ProvenWork({"a": 3, "b": 2}, {"a": 10, "b": 10}, 4, 10))


@pytest.mark.parametrize(
    "spoil, reason",
    [
        (lambda r: [r[0], r[2], r[1]], "out of order"),
        (lambda r: [r[0], replace(r[1], layers=LayerRange(1, 4)), r[2]], "does not verify"),
        (lambda r: [r[0], replace(r[1], signature=r[2].signature), r[2]], "does not verify"),
        (lambda r: [r[0], r[1], replace(r[2], previous_hash=bytes(32))], "not linked"),
        (lambda r: [r[1], r[2]], "out of order|do not start"),
        # the positions count is signed: raising it breaks the signature
        (lambda r: [r[0], replace(r[1], positions=r[1].positions * 4), r[2]], "does not verify"),
        (lambda r: [r[0], r[1], replace(r[2], positions=r[2].positions + 1)], "does not verify"),
        (lambda r: [r[0], replace(r[1], model_layers=3), r[2]], "does not verify"),
    ],
)
def test_a_spoiled_chain_is_refused(spoil: object, reason: str) -> None:
    receipts = spoil(chain("r", [ENTRY, A, B]))  # type: ignore[operator]
    with pytest.raises(UnverifiedWork, match=reason):
        proven_work("r", receipts, signers(A, B))


def test_only_nodes_named_as_serving_are_credited() -> None:
    receipts = chain("r", [ENTRY, A, B])
    credits = credits_for("r", 8, ["b"], receipts, signers(A, B))
    assert [(c.node_id, c.layers, c.credit) for c in credits] == [("b", 1, 2)]
    with pytest.raises(UnverifiedWork, match="another request"):
        credits_for("other", 8, ["a"], receipts, signers(A))


# -- failover: an answer of several segments ---------------------------------------------


def test_each_node_is_credited_for_the_positions_its_segment_added() -> None:
    receipts = failed_over()
    assert [len(s) for s in segments_of(receipts)] == [2, 3]
    credits = credits_for("r", 160, ["a", "b", "c"], receipts, signers(A, B, C))
    # L x T = 4 x 40 = 160 units: A ran 2 layers of all 40 positions (10, then 30 more);
    # C served 30 of the 40 (three quarters of what a whole answer earns: 40); B could
    # not sign for its 10, the entry is no admitted node: 40 units to the treasury.
    assert shares(credits) == {"a": (40, 80), "c": (30, 30)}
    assert sum(c.credit for c in credits) <= 160


def test_a_node_that_served_a_quarter_earns_a_quarter() -> None:
    # B (alive when the route moved on: say the entry changed route after a timeout)
    # signs its 10 positions; C the 30 it added.
    receipts = chain("r", [ENTRY, A, B], 10) + chain("r", [ENTRY, A, C], 40)
    credits = credits_for("r", 160, ["a", "b", "c"], receipts, signers(A, B, C))
    assert shares(credits) == {"a": (40, 80), "b": (10, 10), "c": (30, 30)}
    alone = credits_for("r", 160, ["c"], chain("r", [ENTRY, A, C], 40), signers(A, C))
    assert shares(alone)["c"] == (40, 40)  # C for the whole answer: four times B's


def test_a_replayed_segment_credits_nothing_more() -> None:
    first, second = chain("r", [ENTRY, A, B], 10), chain("r", [ENTRY, A, C], 40)
    honest = credits_for("r", 160, ["a", "b", "c"], first + second, signers(A, B, C))
    for replayed in (first + first + second, first + second + second, first + second + first):
        got = credits_for("r", 160, ["a", "b", "c"], replayed, signers(A, B, C))
        assert shares(got) == shares(honest)


def test_a_segment_cannot_be_spliced_from_two_real_ones() -> None:
    first, second = chain("r", [ENTRY, A, B], 10), chain("r", [ENTRY, A, C], 40)
    with pytest.raises(UnverifiedWork, match="not linked"):
        proven_work("r", [first[0], second[1], second[2]], signers(A, B, C))
    with pytest.raises(UnverifiedWork, match="another request"):  # a segment of another request
        proven_work("r", first + chain("r-old", [ENTRY, A, C], 40), signers(A, B, C))


def test_a_node_appears_once_per_segment() -> None:
    twin = KitNode("a", "a" * 64, LayerRange(3, 4), identity=A.identity)
    with pytest.raises(UnverifiedWork, match=r"twice|differ"):
        proven_work("r", chain("r", [ENTRY, A, twin], 10), signers(A))


def test_a_truncated_chain_does_not_raise_a_share() -> None:
    # The entry drops B's receipt: A's chain now ends at layer 3 of 4, but A signed
    # that the model has 4 layers, so its share stays 2/4 (the old rule paid 2/3).
    truncated = chain("r", [ENTRY, A], 10, model_layers=4)
    credits = credits_for("r", 120, ["a"], truncated, signers(A))
    assert shares(credits) == {"a": (10, 60)}
    lying = chain("r", [ENTRY, A], 10, model_layers=3)  # A's own statement, if it lied
    with pytest.raises(UnverifiedWork, match="disagree"):
        proven_work("r", lying + chain("r", [ENTRY, A, B], 20), signers(A, B))


def test_positions_are_shares_so_no_count_raises_the_total() -> None:
    # every stage ran 40 (say a choice of n that shares its prompt, more positions than
    # the completion tokens it reserved): each node its layers' share, nothing more
    credits = credits_for("r", 100, ["a", "b"], chain("r", [ENTRY, A, B], 40), signers(A, B))
    assert shares(credits) == {"a": (40, 50), "b": (40, 25)}
    huge = credits_for("r", 100, ["a", "b"], chain("r", [ENTRY, A, B], 2**31), signers(A, B))
    assert shares(huge) == {"a": (2**31, 50), "b": (2**31, 25)}


def test_a_stage_is_credited_no_more_positions_than_the_stages_before_it_ran() -> None:
    # B signed 12 positions but A only ran (and sent it) 10: the hop before gave up on
    # B's two late steps, which are no part of the answer
    receipts = chain("r", [ENTRY, A, B], [10, 10, 12])
    work = proven_work("r", receipts, signers(A, B))
    assert (dict(work.positions), work.total_positions) == ({"a": 10, "b": 10}, 10)
    assert sum(c.credit for c in split_cost(48, work)) <= 48


def test_any_mix_of_segments_conserves_the_cost() -> None:
    """Random failovers, replays, drops and reorders: never more than the cost in all,
    never a node credited more positions than the most it signed for."""
    rng = random.Random(7)
    nodes = {"a": A, "b": B, "c": C}
    for _ in range(60):
        segments, top = [], 0
        for _ in range(rng.randint(1, 4)):
            top += rng.randint(0, 20)
            route = [ENTRY, A, rng.choice([B, C])][: rng.randint(1, 3)]
            segments.append(chain("r", route, top, model_layers=4))
        rng.shuffle(segments) if rng.random() < 0.3 else None
        if rng.random() < 0.3:
            segments.append(rng.choice(segments))
        receipts = [r for s in segments for r in s]
        cost = rng.randint(0, 1000)
        credits = credits_for("r", cost, nodes, receipts, signers(A, B, C))
        assert sum(c.credit for c in credits) <= cost
        for c in credits:
            signed = [
                r.positions for r in receipts if r.signer == nodes[c.node_id].identity.fingerprint
            ]
            assert c.positions <= max(signed)
