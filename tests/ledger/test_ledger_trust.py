"""Issue 9's attacks on who may claim what, each reproduced and now refused.

1. node-id squatting and relays: registration and admission need a claim signed
   by the node's attested key, naming its operator, node id and this ledger;
   admissions expire unless renewed;
2. an entry node trusted with everything: a charge needs the user's key hash,
   credits are bounded by the request, receipts must verify, a spend limit holds;
5. recovery by lease, idempotency keys; 6. bounds.

Runs on every backend where the item applies; where it does not (per-request
charging moves off chain: epoch settlement), the skip says so.
"""

from __future__ import annotations

import time
from dataclasses import replace

import pytest
import sqlalchemy as sa
from ledger_harness import World
from trust_kit import KitNode, admitted, chain, entry_stage

from teeshard.ledger.claims import AttestedNode
from teeshard.ledger.interface import (
    MAX_AMOUNT,
    ClaimRefused,
    DuplicateNode,
    InvalidAmount,
    SpendLimitExceeded,
    Unauthorized,
    UnknownNode,
    UnverifiedWork,
)
from teeshard.model.layer_range import LayerRange

HASH = "c" * 64
OFF_CHAIN = "per-request charging is off chain (epoch settlement); the SQL ledger checks this"


def sql_only(world: World) -> None:
    if not world.sql:
        pytest.skip(OFF_CHAIN)


# -- 1. who may register and be admitted ------------------------------------------------


def test_mallory_cannot_squat_carols_node(world: World) -> None:
    carols = KitNode("carol-node", HASH, LayerRange(0, 2))  # carol's node, started --operator carol
    carol, as_carol = world.new_account()
    mallory, as_mallory = world.new_account()
    # The attack: mallory registers carol's node first. Carol's node only ever signs
    # claims naming carol, so mallory has no claim for herself...
    with pytest.raises(ClaimRefused, match="names operator"):
        as_mallory.register_node(carols.info(), claim=carols.claim(carol, as_mallory))
    if world.sql:
        with pytest.raises(ClaimRefused):  # ...and no claim at all is no registration
            as_mallory.register_node(carols.info())
    # ...a claim made with a key of her own registers, but the admitting entry node
    # fetches the claim from the genuine node it verified, which names carol:
    forged = KitNode("carol-node", HASH, LayerRange(0, 2))
    as_mallory.register_node(forged.info(), claim=forged.claim(mallory, as_mallory))
    with pytest.raises(ClaimRefused, match="names operator"):
        world.entry.admit_node("carol-node", HASH, attested=carols.attested(carol, world.entry))
    assert not world.entry.is_operator(mallory)
    if world.sql:  # an unadmitted registration reserves nothing: carol takes her node
        as_carol.register_node(carols.info(), claim=carols.claim(carol, as_carol))
        world.entry.admit_node("carol-node", HASH, attested=carols.attested(carol, world.entry))
        (node,) = world.entry.nodes()
        assert (node.operator, node.admitted) == (carol, True)


def test_a_relay_cannot_be_admitted_with_someone_elses_bundle(world: World) -> None:
    genuine = KitNode("10.0.0.7:8000", HASH, LayerRange(0, 2))
    carol, _ = world.new_account()
    mallory, as_mallory = world.new_account()
    relay = KitNode("relay:9000", HASH, LayerRange(0, 2))  # no TEE: mallory's own key
    as_mallory.register_node(relay.info(), claim=relay.claim(mallory, as_mallory))
    # The entry verifies the bundle the relay passes on (the genuine node's) and
    # fetches the claim through the relay: it is the genuine node's claim.
    passed_on = AttestedNode(relay.url, genuine.claim(carol, world.entry))
    with pytest.raises(ClaimRefused):
        world.entry.admit_node("relay:9000", HASH, attested=passed_on)
    if world.sql:
        # nor with the relay's own claim for a URL other than the one verified
        wrong_url = AttestedNode(genuine.url, relay.claim(mallory, world.entry))
        with pytest.raises(ClaimRefused, match="not the URL registered"):
            world.entry.admit_node("relay:9000", HASH, attested=wrong_url)
        with pytest.raises(ClaimRefused):  # an admission names what was verified
            world.entry.admit_node("relay:9000", HASH)
    assert not world.entry.is_operator(mallory)


def test_a_claim_for_another_ledger_is_worthless(world: World) -> None:
    node = KitNode("n-other", HASH, LayerRange(0, 2))
    operator, as_operator = world.new_account()
    from teeshard.ledger.claims import sign_claim

    elsewhere = sign_claim(node.identity, operator, node.node_id, "another-ledger", b"n" * 32)
    with pytest.raises(ClaimRefused, match="names ledger"):
        as_operator.register_node(node.info(), claim=elsewhere)


def test_admissions_expire_unless_renewed(sql: World) -> None:
    sql.owner.set_admission_epoch(0.5)  # type: ignore[attr-defined]
    operator, _, node = admitted(sql, "n-epoch", HASH, "0:2")
    account, _ = sql.new_account(funds=100)
    assert sql.entry.is_operator(operator)  # free use while live and attested
    time.sleep(0.6)
    # The attack: a node attested once, then gone (or replaced by a relay), kept
    # its operator's free use forever. Now the admission lapses with the epoch:
    assert not sql.entry.is_operator(operator)
    assert not sql.entry.nodes()[0].admitted
    sql.reserve(sql.entry, "late", account, 10)
    with pytest.raises(UnknownNode, match="expired"):
        sql.entry.settle("late", 10, {"n-epoch": 5})
    sql.entry.admit_node("n-epoch", HASH, attested=node.attested(operator, sql.entry))
    assert sql.entry.is_operator(operator)


# -- 2. charges carry the user's authorisation ------------------------------------------


def test_an_entry_cannot_charge_alice_without_her_key(world: World) -> None:
    sql_only(world)
    alice, _ = world.new_account(funds=4000)
    bob, _ = world.new_account(funds=10)
    # The attack: an authorised entry reserved 4,000 from alice without her key.
    with pytest.raises(Unauthorized, match="authorisation"):
        world.entry.reserve("steal", alice, 4000)
    with pytest.raises(Unauthorized, match="does not belong"):  # bob's key is not alice's
        world.entry.reserve("steal", alice, 4000, key_hash=world.key_hash(bob))
    assert world.entry.balance(alice).available == 4000


def test_work_credited_is_bounded_by_the_request(world: World) -> None:
    sql_only(world)
    _, _, node = admitted(world, "greedy", HASH, "1:2")
    account, _ = world.new_account(funds=1000)
    # The attack: settle crediting 2^62-1 tokens of work to the entry's own node.
    world.reserve(world.entry, "r1", account, 100, max_tokens=30)
    with pytest.raises(InvalidAmount, match="more than the request could have served"):
        world.entry.settle("r1", 100, {"greedy": MAX_AMOUNT - 1})
    with pytest.raises(InvalidAmount):
        world.entry.settle("r1", 100, {"greedy": 31})
    # Work is credited only against a receipt the node signed for this request.
    receipts = chain("r1", [entry_stage(LayerRange(0, 1)), node])
    world.entry.settle("r1", 100, {"greedy": 30}, receipts=receipts)
    (record,) = world.entry.nodes()
    assert (record.served_tokens, record.earned) == (30, 50)  # 1 layer of 2: half the cost


def test_receipts_must_be_the_nodes_own(world: World) -> None:
    sql_only(world)
    _, _, node = admitted(world, "honest", HASH, "1:2")
    account, _ = world.new_account(funds=1000)
    world.reserve(world.entry, "r2", account, 100)
    impostor = KitNode("honest", HASH, LayerRange(1, 2))  # same claims, another key
    with pytest.raises(UnverifiedWork):
        # a receipt for another request, replayed
        world.entry.settle(
            "r2", 100, {"honest": 5}, receipts=chain("r-old", [entry_stage(LayerRange(0, 1)), node])
        )
    forged = chain("r2", [entry_stage(LayerRange(0, 1)), impostor])
    world.entry.settle("r2", 100, {"honest": 5}, receipts=forged)
    # an unknown signer earns nothing: the revenue goes to the treasury
    assert world.entry.nodes()[0].earned == 0
    assert world.entry.distribute().treasury == 100


def test_a_node_is_credited_once_per_request(world: World) -> None:
    sql_only(world)
    _, _, node = admitted(world, "twice", HASH, "0:1")
    account, _ = world.new_account(funds=1000)
    world.reserve(world.entry, "r3", account, 100)
    second = KitNode("x", HASH, LayerRange(1, 2), identity=node.identity)
    with pytest.raises(UnverifiedWork, match=r"twice|differ"):
        world.entry.settle("r3", 100, {"twice": 5}, receipts=chain("r3", [node, second]))


def _failover_nodes(world: World) -> tuple[KitNode, KitNode, KitNode, str]:
    """A (1:3), B and its replica C (3:4) admitted; an account with funds."""
    slots = (("fa", "a", "1:3"), ("fb", "b", "3:4"), ("fc", "d", "3:4"))
    nodes = [admitted(world, name, m * 64, layers)[2] for name, m, layers in slots]
    account, _ = world.new_account(funds=1000)
    return nodes[0], nodes[1], nodes[2], account


def test_a_failed_over_answer_credits_each_node_by_its_segment(world: World) -> None:
    sql_only(world)
    a, b, c, account = _failover_nodes(world)
    entry = entry_stage(LayerRange(0, 1))
    world.reserve(world.entry, "f1", account, 160, max_tokens=50)
    # B served positions [0, 10) and signed (the route moved on after a timeout); C
    # rebuilt the session and ran to 40. A served throughout.
    receipts = chain("f1", [entry, a, b], 10) + chain("f1", [entry, a, c], 40)
    world.entry.settle("f1", 160, {"fa": 41, "fb": 41, "fc": 41}, receipts=receipts)
    earned = {n.node_id: n.earned for n in world.entry.nodes()}
    # 4 layers x 40 positions = 160 units: A 2x40, B 1x10, C 1x30; the entry's 40 units
    # (no admitted node) go to the treasury.
    assert earned == {"fa": 80, "fb": 10, "fc": 30}
    assert world.entry.distribute().treasury == 40
    assert world.owner.check().ok


@pytest.mark.parametrize("attack", ["inflate", "splice", "replay"])
def test_an_entry_cannot_inflate_a_failed_over_answer(world: World, attack: str) -> None:
    sql_only(world)
    a, b, c, account = _failover_nodes(world)
    entry = entry_stage(LayerRange(0, 1))
    world.reserve(world.entry, "f2", account, 160, max_tokens=40)
    first, second = chain("f2", [entry, a, b], 10), chain("f2", [entry, a, c], 40)
    served = {"fa": 40, "fb": 40, "fc": 40}
    if attack == "replay":  # B's segment twice: it adds no positions
        world.entry.settle("f2", 160, served, receipts=first + first + second)
        earned = {n.node_id: n.earned for n in world.entry.nodes()}
        assert earned == {"fa": 80, "fb": 10, "fc": 30}
        return
    spoiled = {
        "inflate": [*first[:2], replace(first[2], positions=40), *second],  # B claims all 40
        "splice": [*first, second[0], first[1], second[2]],  # a segment made of two
    }[attack]
    with pytest.raises(UnverifiedWork):
        world.entry.settle("f2", 160, served, receipts=spoiled)
    assert world.entry.balance(account).reserved == 160  # nothing moved
    assert all(n.earned == 0 for n in world.entry.nodes())
    world.entry.settle("f2", 160, served, receipts=first + second)  # the honest settle still works
    assert sorted(n.earned for n in world.entry.nodes()) == [10, 30, 80]


def test_an_entry_nodes_spend_limit(world: World) -> None:
    sql_only(world)
    world.owner.authorize_entry(world.entry.actor, spend_limit=500, period_s=3600)
    account, _ = world.new_account(funds=10_000)
    world.reserve(world.entry, "s1", account, 300)
    world.entry.settle("s1", 200, {})
    world.reserve(world.entry, "s2", account, 300)  # 200 charged + 300 held
    with pytest.raises(SpendLimitExceeded, match="spent 500 of its limit 500"):
        world.reserve(world.entry, "s3", account, 1)
    world.entry.release("s2")
    world.reserve(world.entry, "s3", account, 300)
    assert world.entry.balance(account).available == 10_000 - 200 - 300


# -- 5. faults: recovery by lease, idempotency ---------------------------------------------


def test_a_replica_does_not_release_another_replicas_live_reservations(world: World) -> None:
    sql_only(world)
    account, _ = world.new_account(funds=1000)
    first = world.restarted_entry()  # two processes of the same entry node
    second = world.restarted_entry()
    world.reserve(first, "live", account, 400)
    # The attack: the second replica's recover() released the first one's reservation.
    assert second.recover() == []
    first.settle("live", 300, {})  # so the user pays
    assert world.entry.balance(account).available == 700
    world.reserve(first, "dead", account, 100)
    world.expire_leases()  # the first replica stops (no heartbeat)
    assert second.recover() == ["dead"]
    assert world.owner.check().ok


def test_open_reservations_are_listed_as_stuck(world: World) -> None:
    sql_only(world)
    account, _ = world.new_account(funds=100)
    world.reserve(world.entry, "stuck", account, 60)
    assert [r.request_id for r in world.owner.open_reservations(0.0)] == ["stuck"]
    assert world.owner.open_reservations(3600.0) == []


def test_an_idempotency_key_charges_once(world: World) -> None:
    sql_only(world)
    account, _ = world.new_account(funds=1000)
    first = world.reserve(world.entry, "try-1", account, 100, idempotency_key="k-1")
    world.entry.settle("try-1", 80, {})
    again = world.reserve(world.entry, "try-2", account, 100, idempotency_key="k-1")
    assert (again.request_id, again.cost) == (first.request_id, 80)  # the charged one
    assert world.entry.balance(account).available == 920
    # a try that was released frees its key
    world.reserve(world.entry, "try-3", account, 100, idempotency_key="k-2")
    world.entry.release("try-3")
    assert world.reserve(world.entry, "try-4", account, 50, idempotency_key="k-2").request_id == (
        "try-4"
    )


# -- 6. bounds ---------------------------------------------------------------------------


def test_sums_stay_integers_and_check_holds(sql: World) -> None:
    account, _ = sql.new_account()
    sql.owner.deposit(account, MAX_AMOUNT - 1)
    # The attack: a second (third) deposit of 2^62-1 made SQLite store a float.
    with pytest.raises(InvalidAmount, match="limit"):
        sql.owner.deposit(account, MAX_AMOUNT - 1)
    other, _ = sql.new_account()
    sql.owner.deposit(other, MAX_AMOUNT - 1)  # journal sums above 2^63 are fine
    check = sql.owner.check()
    assert check.ok and check.total_in == 2 * (MAX_AMOUNT - 1)


def test_balances_are_checked_by_the_database(sql: World) -> None:
    account, _ = sql.new_account(funds=10)
    engines = sql.owner.engines  # type: ignore[attr-defined]
    # PostgreSQL's BIGINT rounds 1.5 on assignment; SQLite's STRICT table refuses it
    for value in (f"{MAX_AMOUNT}", "-1", *(["1.5"] if sql.name == "sqlite" else [])):
        with pytest.raises(sa.exc.DatabaseError), engines.write.begin() as conn:
            conn.exec_driver_sql(f"UPDATE accounts SET available = {value} WHERE id = '{account}'")
    assert sql.owner.check().ok


def test_pool_cannot_grow_past_the_limit(sql: World) -> None:
    big = MAX_AMOUNT // 2 + 1
    accounts = [sql.new_account(funds=big)[0] for _ in range(2)]
    sql.reserve(sql.entry, "b1", accounts[0], big)
    sql.entry.settle("b1", big, {})
    sql.reserve(sql.entry, "b2", accounts[1], big)
    with pytest.raises(InvalidAmount):  # would take the pool past 2^62: refused, not stuck
        sql.entry.settle("b2", big, {})
    assert sql.entry.distribute().treasury == big  # distribution still works
    sql.entry.settle("b2", big, {})  # and so does the settle afterwards
    assert sql.owner.check().ok


def test_duplicate_registration_of_an_admitted_node(world: World) -> None:
    operator, as_operator, node = admitted(world, "dup", HASH, "0:2")
    with pytest.raises(DuplicateNode):
        as_operator.register_node(node.info(), claim=node.claim(operator, as_operator))
