"""LedgerBilling driven as the entry node's generation loop drives it, on every backend."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from ledger_harness import World
from trust_kit import KitNode, admitted, chain, entry_stage

from teeshard.entry.billing import BillingAPI
from teeshard.entry.errors import APIError
from teeshard.entry.generation import Generation
from teeshard.entry.serving import _usage
from teeshard.ledger.billing import ChargeRequest, IdempotentReplay, LedgerBilling
from teeshard.ledger.outbox import Outbox
from teeshard.ledger.pricing import ModelPrice, Pricing
from teeshard.model.layer_range import LayerRange

PRICING = Pricing(models={"tiny": ModelPrice(prompt_per_1k=1000, completion_per_1k=2000)})


def customer(world: World, funds: int, key: str) -> str:
    account, as_account = world.new_account(funds=funds)
    as_account.add_api_key(account, key)
    return account


def charge(
    key: str | None,
    prompt: int = 10,
    max_tokens: int = 20,
    rid: str = "g1",
    idem: str | None = None,
) -> ChargeRequest:
    return ChargeRequest(rid, key, "tiny", prompt, max_tokens, idempotency_key=idem)


async def test_reserve_then_settle_charges_usage_and_credits_the_chain(world: World) -> None:
    _, _, node = admitted(world, "node-1", "d" * 64, "1:2")
    account = customer(world, 1000, "tsk_customer")
    billing = LedgerBilling(world.entry, PRICING)
    reservation = await billing.reserve(charge("tsk_customer"))
    assert reservation.reserved == 10 + 40  # the most it can cost: 10 prompt + 20 completion
    assert world.entry.balance(account).reserved == 50
    # the serving chain: the entry itself (not registered) and node-1
    receipts = chain("g1", [entry_stage(LayerRange(0, 1)), node])
    settlement = await billing.settle(
        reservation, 10, 7, ["entry:8000", "node-1"], receipts=receipts
    )
    assert (settlement.cost, settlement.balance) == (10 + 14, 1000 - 24)
    balance = world.entry.balance(account)
    assert (balance.available, balance.reserved) == (976, 0)
    assert {n.node_id: n.served_tokens for n in world.entry.nodes()} == {"node-1": 17}
    if world.sql:  # its receipt earns it its layer's share of what was paid: 1 of 2
        assert {n.node_id: n.earned for n in world.entry.nodes()} == {"node-1": 12}
    assert world.entry.pool() == 24
    # usage and cost in the response
    generation = Generation("g1", 10, 7, "stop", reservation=reservation, settlement=settlement)
    usage = _usage([generation])
    assert (usage["total_tokens"], usage["cost"], usage["balance"]) == (17, 24, 976)


async def test_failed_generation_is_released_in_full(world: World) -> None:
    account = customer(world, 100, "tsk_fail")
    billing = LedgerBilling(world.entry, PRICING)
    reservation = await billing.reserve(charge("tsk_fail", rid="g-fail"))
    await billing.release(reservation)
    await billing.release(reservation)  # cleanup paths may call it twice
    balance = world.entry.balance(account)
    assert (balance.available, balance.reserved) == (100, 0)
    assert world.owner.check().ok


async def test_no_balance_is_402_and_bad_keys_401(world: World) -> None:
    customer(world, 49, "tsk_poor")
    billing = BillingAPI(LedgerBilling(world.entry, PRICING))
    with pytest.raises(APIError) as caught:
        await billing.reserve(charge("tsk_poor"))
    assert caught.value.status == 402 and caught.value.code == "insufficient_balance"
    assert "up to 50" in caught.value.message and "49 available" in caught.value.message
    for key, code in ((None, "missing_api_key"), ("tsk_nobody", "invalid_api_key")):
        with pytest.raises(APIError) as caught:
            await billing.reserve(charge(key))
        assert (caught.value.status, caught.value.code) == (401, code)


async def test_operators_use_the_model_free(world: World) -> None:
    op, as_op = world.new_account()  # no funds at all
    as_op.add_api_key(op, "tsk_operator")
    node = KitNode("node-op", "e" * 64, LayerRange(0, 2))
    as_op.register_node(node.info(), claim=node.claim(op, as_op))
    billing = BillingAPI(LedgerBilling(world.entry, PRICING))
    with pytest.raises(APIError) as caught:  # registered but not admitted: no privileges
        await billing.reserve(charge("tsk_operator", rid="g-op0"))
    assert caught.value.status == 402
    world.owner.admit_node("node-op", "e" * 64, attested=node.attested(op, world.owner))
    reservation = await billing.reserve(charge("tsk_operator", rid="g-op"))
    assert reservation.reserved == 0 and reservation.account == op
    settlement = await billing.settle(reservation, 10, 20, ["node-op"])
    assert settlement.cost == 0
    assert world.entry.pool() == 0
    # free use credits no work: an operator cannot raise its own share
    assert world.entry.nodes()[0].served_tokens == 0


async def test_recovery_at_start(world: World) -> None:
    account = customer(world, 100, "tsk_crash")
    billing = LedgerBilling(world.entry, PRICING)
    await billing.reserve(charge("tsk_crash", rid="g-crash"))
    world.expire_leases()  # the process died: no more heartbeats
    restarted = LedgerBilling(world.restarted_entry(), PRICING)
    assert restarted.recover() == ["g-crash"]
    assert world.entry.balance(account).available == 100


def test_billing_from_url_opens_the_ledger_with_pricing_and_recovers(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from teeshard.ledger.billing import billing_from_url
    from teeshard.ledger.keys import hash_api_key
    from teeshard.ledger.sql import SqlLedger

    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    owner = SqlLedger.open(url, "owner")
    owner.open_account("alice")
    owner.deposit("alice", 100)
    owner.authorize_entry("entry-9")
    owner.add_api_key("alice", "tsk_alice")
    crashed = owner.as_actor("entry-9", lease_ttl_s=0.01)  # a process that dies at once
    crashed.reserve("left-open", "alice", 70, key_hash=hash_api_key("tsk_alice"))
    pricing = tmp_path / "pricing.toml"
    pricing.write_text('[models."tiny"]\nprompt_per_1k = 3000\ncompletion_per_1k = 5000\n')
    billing = billing_from_url(url, pricing, actor="entry-9", outbox=tmp_path / "outbox.sqlite")
    try:
        assert billing.pricing.for_model("tiny").completion_per_1k == 5000
        assert owner.balance("alice").available == 100  # recovered at start
    finally:
        billing.close()
        owner.close()


async def test_per_character_pricing_charges_the_characters_returned(world: World) -> None:
    """The original system's pricing, as an option: per character of the completion."""
    legacy = Pricing(
        models={"tiny": ModelPrice(scheme="per_character", per_character=2, max_chars_per_token=8)}
    )
    account = customer(world, 10_000, "tsk_legacy")
    billing = LedgerBilling(world.entry, legacy)
    reservation = await billing.reserve(charge("tsk_legacy", max_tokens=20, rid="g-chars"))
    assert reservation.reserved == 20 * 8 * 2  # the bound: 8 characters per token at most
    settlement = await billing.settle(reservation, 10, 20, [], completion_chars=37)
    assert settlement.cost == 37 * 2
    assert world.entry.balance(account).available == 10_000 - 74
    assert world.entry.balance(account).reserved == 0


async def test_per_character_pricing_without_characters_charges_nothing(world: World) -> None:
    legacy = Pricing(models={"tiny": ModelPrice(scheme="per_character")})
    account = customer(world, 10_000, "tsk_nochars")
    billing = BillingAPI(LedgerBilling(world.entry, legacy))
    reservation = await billing.reserve(charge("tsk_nochars", rid="g-nochars"))
    with pytest.raises(APIError) as refused:
        await billing.settle(reservation, 10, 20, [])
    assert refused.value.status == 500 and refused.value.code == "pricing_error"
    assert world.entry.balance(account).available == 10_000  # released, not charged
    assert world.entry.balance(account).reserved == 0


async def test_an_idempotency_key_is_charged_once(world: World) -> None:
    account = customer(world, 1000, "tsk_idem")
    billing = LedgerBilling(world.entry, PRICING)
    first = await billing.reserve(charge("tsk_idem", rid="i-1", idem="key-1"))
    if not world.sql:
        pytest.skip("per-request charging is the SQL ledger's; on chain: epoch settlement")
    with pytest.raises(IdempotentReplay) as running:  # the retry while the first runs
        await billing.reserve(charge("tsk_idem", rid="i-2", idem="key-1"))
    assert (running.value.request_id, running.value.state) == ("i-1", "reserved")
    await billing.settle(first, 10, 5, [])
    with pytest.raises(IdempotentReplay) as charged:  # the retry after it was charged
        await billing.reserve(charge("tsk_idem", rid="i-3", idem="key-1"))
    assert charged.value.state == "settled"
    assert world.entry.balance(account).available == 1000 - 20  # charged once


async def test_a_transient_ledger_failure_is_retried_from_the_outbox(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real failure: another process holds SQLite's write lock while the entry settles."""
    from teeshard.ledger.keys import hash_api_key
    from teeshard.ledger.sql import SqlLedger, engine

    monkeypatch.setattr(engine, "SQLITE_BUSY_TIMEOUT_S", 0.2)
    path = tmp_path / "ledger.db"
    owner = SqlLedger.open(f"sqlite:///{path}", "owner")
    owner.open_account("alice")
    owner.deposit("alice", 1000)
    owner.add_api_key("alice", "tsk_alice")
    owner.authorize_entry("entry-1")
    outbox = tmp_path / "outbox.sqlite"
    billing = LedgerBilling(owner.as_actor("entry-1"), PRICING, outbox=Outbox(outbox))
    reservation = await billing.reserve(charge("tsk_alice", rid="t-1"))
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")  # the database is busy (a backup, a long writer)
    settled = await billing.settle(reservation, 10, 5, [])
    assert settled.cost == 20 and settled.balance is None  # charged, the ledger is behind
    assert [i.request_id for i in billing.outbox.pending()] == ["t-1"]
    assert billing.flush() == 1  # still busy: kept, with the same request id
    blocker.execute("ROLLBACK")
    blocker.close()
    # a restart finds it in the outbox file and settles it (once)
    again = LedgerBilling(owner.as_actor("entry-1"), PRICING, outbox=Outbox(outbox))
    assert again.flush() == 0 and billing.flush() == 0
    balance = owner.balance("alice")
    assert (balance.available, balance.reserved) == (1000 - 20, 0)
    assert owner.reservation("t-1").cost == 20
    assert hash_api_key("tsk_alice") and owner.check().ok
    owner.close()
