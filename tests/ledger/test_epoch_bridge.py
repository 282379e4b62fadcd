"""The bridge between the SQL ledger and epoch settlement (issue 9, item 7), end to end.

Alice escrows on chain, the bridge credits it into the SQL ledger once, she pays
for requests there (LedgerBilling, with receipts), the epoch posts, and carol
(an operator whose SQL account is her wallet address) claims and withdraws
exactly what SQL credited her. On SQLite and PostgreSQL, with the in-process
EVM and with anvil. The attacks: escrow credited twice (a rescan, two bridges at
once), a forged claim, a second settle of the same epoch, a crash between the
SQL payout and the root, and paying on chain what was never escrowed.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from chain_tools import chain_world
from ledger_harness import EvmWorld, SqlWorld, postgres_url, reset_postgres, sql_world
from trust_kit import KitNode, chain, entry_stage

from teeshard.ledger.billing import ChargeRequest, LedgerBilling
from teeshard.ledger.epochs import BridgeError, EpochBridge
from teeshard.ledger.evm import EvmLedger
from teeshard.ledger.evm.errors import InvalidProof
from teeshard.ledger.evm.settlement import Claim, EpochSettler, claim, deposit_escrow
from teeshard.ledger.interface import (
    DuplicateRequest,
    InsufficientBalance,
    LedgerError,
    Unauthorized,
)
from teeshard.ledger.pricing import ModelPrice, Pricing
from teeshard.ledger.sql import SqlLedger
from teeshard.model.layer_range import LayerRange

PRICING = Pricing(models={"tiny": ModelPrice(prompt_per_1k=1000, completion_per_1k=2000)})
COMBOS = [("sqlite", "evm"), ("postgres", "evm"), ("sqlite", "anvil"), ("postgres", "anvil")]


@dataclass
class Both:
    sql: SqlWorld
    evm: EvmWorld
    settler: EvmLedger
    store: Path

    @property
    def owner(self) -> SqlLedger:
        assert isinstance(self.sql.owner, SqlLedger)
        return self.sql.owner

    def bridge(self, store: Path | bool | None = True) -> EpochBridge:
        return EpochBridge(self.owner, self.settler, self.store if store is True else store or None)

    def wallet(self) -> tuple[str, EvmLedger]:
        address, ledger = self.evm.new_account()
        assert isinstance(ledger, EvmLedger)
        return address, ledger

    def operator(self, node_id: str = "node-c") -> tuple[str, EvmLedger, KitNode]:
        """Carol: a wallet, an SQL account named by it, and an admitted node she operates."""
        address, wallet = self.wallet()
        self.owner.open_account(address)
        node = KitNode(node_id, "c" * 64, LayerRange(1, 2))
        as_carol = self.owner.as_actor(address)
        as_carol.register_node(node.info(), claim=node.claim(address, as_carol))
        self.owner.admit_node(node_id, node.manifest, attested=node.attested(address, self.owner))
        return address, wallet, node

    def posted(self) -> int:
        return int(self.settler._call("epochs_posted"))


@pytest.fixture(params=COMBOS, ids=["-".join(c) for c in COMBOS])
def both(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Both]:
    sql_name, evm_name = request.param
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    if sql_name == "postgres":
        url = postgres_url() or ""
        if not url:
            pytest.skip("no PostgreSQL: set TEESHARD_TEST_POSTGRES_URL (scripts/services.sh)")
        reset_postgres(url)
    sql = sql_world(sql_name, url)
    request.param = evm_name  # chain_world reads the backend from it
    evm = chain_world(request)
    settler = evm.stranger()
    assert isinstance(settler, EvmLedger) and isinstance(evm.owner, EvmLedger)
    evm.owner.authorize_settler(settler.actor)
    assert isinstance(sql, SqlWorld)
    yield Both(sql, evm, settler, tmp_path / "epochs")
    sql.owner.close()
    evm.owner.close()


async def pay(both: Both, key: str, rid: str, node: KitNode, completion: int) -> int:
    """One request as the entry node bills it: reserve, serve (receipts), settle."""
    billing = LedgerBilling(both.sql.entry, PRICING)
    reservation = await billing.reserve(ChargeRequest(rid, key, "tiny", 10, 20))
    receipts = chain(rid, [entry_stage(LayerRange(0, 1)), node])
    settled = await billing.settle(
        reservation, 10, completion, ["entry:8000", node.node_id], receipts=receipts
    )
    return settled.cost


async def test_escrow_to_requests_to_epoch_to_claim_to_withdraw(both: Both) -> None:
    alice, as_alice = both.wallet()
    carol, as_carol, node = both.operator()
    deposit_escrow(as_alice, alice, 1000)
    bridge = both.bridge()
    synced = bridge.sync_escrow()
    assert [(d.account, d.tokens) for d in synced.credited] == [(alice, 1000)]
    assert both.owner.balance(alice).available == 1000  # SQL account named by her address
    both.owner.add_api_key(alice, "tsk_alice")
    spent = [await pay(both, "tsk_alice", f"r{i}", node, 7 + i) for i in range(3)]
    assert spent == [24, 26, 28]  # 10 prompt + 2 per completion token
    result = bridge.settle_epoch()
    assert result.distribution is not None
    earned = result.distribution.shares[carol]  # her layer's share (1 of 2) of what was paid
    assert earned == 12 + 13 + 14 and result.distribution.treasury == sum(spent) - earned
    assert result.batch is not None and dict(result.batch.earnings) == {carol: earned}
    assert result.epoch is not None and dict(result.epoch.amounts) == {carol: earned}
    assert both.owner.balance(carol).earnings == 0  # moved out of SQL as a payout
    assert bridge.claim(carol) == earned  # sent by the settler's key; carol is credited
    assert as_carol.withdraw().earnings == -earned  # her ETH
    # alice takes her unspent escrow back through the same tree
    both.owner.as_actor(alice).request_refund(alice)
    refund = bridge.settle_epoch()
    assert refund.batch is not None and dict(refund.batch.refunds) == {alice: 1000 - sum(spent)}
    assert refund.epoch is not None and refund.epoch.number == 1
    assert dict(refund.epoch.amounts) == {carol: earned, alice: 1000 - sum(spent)}
    assert EpochSettler(both.settler, both.store).claim(alice) == 1000 - sum(spent)
    assert bridge.claim(carol) == 0  # cumulative: nothing more for carol
    assert as_alice.withdraw().earnings == -(1000 - sum(spent))
    # totals to the token: all that was escrowed is withdrawn or is the treasury's
    sql_check, chain_check = both.owner.check(), both.evm.owner.check()
    assert sql_check.ok and chain_check.ok, (sql_check, chain_check)
    assert (sql_check.total_in, sql_check.total_out) == (1000, 1000 - sum(spent) + earned)
    treasury = both.owner.balance("@treasury").earnings
    assert treasury == sum(spent) - earned == sql_check.held
    assert int(both.settler._call("escrow")) == treasury  # what is left on chain


def test_escrow_is_credited_once_by_rescans_and_by_two_bridges(both: Both) -> None:
    alice, as_alice = both.wallet()
    deposit_escrow(as_alice, alice, 500)
    deposit_escrow(as_alice, alice, 250)
    assert len(both.bridge().sync_escrow().credited) == 2
    again = both.bridge().sync_escrow()  # nothing new since the last block processed
    assert again.credited == () and again.already == 0
    both.owner.set_bridge_state(f"escrow_block:{both.settler.address}", "0")  # a rescan
    rescan = both.bridge().sync_escrow()
    assert rescan.credited == () and rescan.already == 2
    assert both.owner.balance(alice).available == 750
    # two bridge processes (each its own connections) rescan at the same time
    deposit_escrow(as_alice, alice, 100)
    both.owner.set_bridge_state(f"escrow_block:{both.settler.address}", "0")
    ledgers = [SqlLedger.open(both.sql.url, "owner") for _ in range(4)]
    start, credited, errors = threading.Barrier(4), [], []

    def run(ledger: SqlLedger) -> None:
        try:
            bridge = EpochBridge(ledger, both.settler.as_key(both.settler.key))
            start.wait()
            credited.append(len(bridge.sync_escrow().credited))
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(ledger,)) for ledger in ledgers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for ledger in ledgers:
        ledger.close()
    assert not errors and sum(credited) == 1, (credited, errors)
    assert both.owner.balance(alice).available == 850
    assert both.owner.check().ok


def test_the_same_reference_cannot_be_credited_differently_or_by_anyone(both: Both) -> None:
    alice, _ = both.wallet()
    ref = "escrow:0x" + "ab" * 32 + ":0"
    assert both.owner.credit_escrow(alice, 100, ref) is not None
    assert both.owner.credit_escrow(alice, 100, ref) is None  # the same deposit: once
    mallory, _ = both.wallet()
    with pytest.raises(DuplicateRequest):
        both.owner.credit_escrow(mallory, 100, ref)
    with pytest.raises(DuplicateRequest):
        both.owner.credit_escrow(alice, 900, ref)
    with pytest.raises(Unauthorized):
        both.owner.as_actor(mallory).credit_escrow(mallory, 100, "escrow:0x00:1")
    with pytest.raises(LedgerError):
        both.owner.credit_escrow("bob", 100, "escrow:0x00:2")  # not a wallet address
    assert both.owner.balance(alice).available == 100
    assert both.owner.check().ok


async def test_forged_claims_and_a_second_settle_pay_nothing(both: Both) -> None:
    alice, as_alice = both.wallet()
    carol, _, node = both.operator()
    mallory, _ = both.wallet()
    deposit_escrow(as_alice, alice, 1000)
    bridge = both.bridge()
    bridge.sync_escrow()
    both.owner.add_api_key(alice, "tsk_alice")
    await pay(both, "tsk_alice", "r1", node, 20)
    both.owner.request_refund(alice)  # two leaves: carol's earnings, alice's refund
    first = bridge.settle_epoch()
    assert first.epoch is not None and first.batch is not None
    earned = first.batch.earnings[carol]
    real = first.epoch.claim(carol)
    for forged in (
        Claim(real.epoch, carol, earned * 10, real.proof),
        Claim(real.epoch, mallory, earned, real.proof),
        Claim(real.epoch, carol, earned, ()),
        Claim(real.epoch, carol, earned, (b"\x00" * 32,)),
    ):
        with pytest.raises(InvalidProof):
            claim(both.evm.stranger(), forged)  # type: ignore[arg-type]
    # the same epoch settled again (another run, a restarted bridge): nothing new
    assert bridge.settle_epoch().batch is None
    assert both.bridge(store=None).settle_epoch().batch is None
    again = both.owner.pay_out_epoch(0, both.settler.address)  # idempotent by epoch
    assert (again.earnings, again.refunds) == (first.batch.earnings, first.batch.refunds)
    assert again.posted_number == 0
    assert both.posted() == 1
    assert bridge.claim(carol) == earned and bridge.claim(carol) == 0  # a replayed claim
    assert both.evm.owner.balance(carol).earnings == earned
    assert both.owner.check().ok and both.evm.owner.check().ok


async def test_a_crash_after_the_sql_payout_neither_loses_nor_doubles(both: Both) -> None:
    alice, as_alice = both.wallet()
    carol, _, node = both.operator()
    deposit_escrow(as_alice, alice, 1000)
    both.bridge().sync_escrow()
    both.owner.add_api_key(alice, "tsk_alice")
    await pay(both, "tsk_alice", "r1", node, 20)
    both.owner.distribute()
    # the bridge paid epoch 0 out of SQL, then crashed before posting its root
    paid = both.owner.pay_out_epoch(0, both.settler.address, 1000)
    earned = paid.earnings[carol]
    with pytest.raises(LedgerError, match="not posted"):
        both.owner.pay_out_epoch(1, both.settler.address, 1000)  # no second unposted epoch
    await pay(both, "tsk_alice", "r2", node, 20)  # work goes on meanwhile
    with pytest.raises(Unauthorized):  # a key that is no settler cannot post it ...
        EpochBridge(both.owner, both.evm.stranger()).settle_epoch()  # type: ignore[arg-type]
    resumed = both.bridge().settle_epoch()  # ... the restarted bridge posts exactly it
    assert resumed.batch == paid and resumed.epoch is not None
    assert dict(resumed.epoch.amounts) == {carol: earned} and both.posted() == 1
    # a crash after posting, before recording it: the next run adopts the root
    both.owner.distribute()
    batch = both.owner.pay_out_epoch(1, both.settler.address, 1000)
    EpochSettler(both.settler, both.store).settle(dict(batch.earnings))
    adopted = both.bridge(store=None).settle_epoch()
    assert adopted.epoch is not None and adopted.epoch.number == 1 and both.posted() == 2
    assert dict(adopted.epoch.amounts) == {carol: earned + batch.earnings[carol]}
    assert both.bridge().claim(carol) == earned + batch.earnings[carol]
    assert both.owner.check().ok and both.evm.owner.check().ok


async def test_tokens_never_escrowed_are_not_paid_on_chain(both: Both) -> None:
    carol, _, node = both.operator()
    bob, _ = both.wallet()
    both.owner.open_account(bob)
    both.owner.deposit(bob, 10_000)  # paid off chain (card, invoice): not in the escrow
    both.owner.add_api_key(bob, "tsk_bob")
    alice, as_alice = both.wallet()
    deposit_escrow(as_alice, alice, 5)
    await pay(both, "tsk_bob", "r1", node, 20)
    with pytest.raises(InsufficientBalance):
        both.bridge().settle_epoch()
    assert both.owner.balance(carol).earnings == 25  # still hers, in SQL
    assert both.owner.payout_batches() == [] and both.posted() == 0
    with pytest.raises(BridgeError):  # and the ledger is bound to its contract
        EpochBridge(both.owner, _other(both))
    assert both.owner.check().ok


def test_a_refund_pays_back_only_what_the_account_escrowed(both: Both) -> None:
    bob, as_bob = both.wallet()
    deposit_escrow(as_bob, bob, 30)
    both.bridge().sync_escrow()
    both.owner.deposit(bob, 10_000)  # off chain: spendable in SQL, not refundable on chain
    both.owner.request_refund(bob)
    epoch = both.bridge().settle_epoch()
    assert epoch.batch is not None and dict(epoch.batch.refunds) == {bob: 30}
    assert both.owner.balance(bob).available == 10_000
    both.owner.request_refund(bob)  # asked again: its escrow is refunded already
    assert both.bridge().settle_epoch().batch is None
    assert both.bridge().claim(bob) == 30 and as_bob.withdraw().earnings == -30
    assert both.owner.check().ok and both.evm.owner.check().ok


def _other(both: Both) -> EvmLedger:
    from teeshard.ledger.evm.chain import new_key

    chain = both.evm.chain
    key = new_key()
    chain.fund(key.address, 10**19)  # type: ignore[attr-defined]
    address, block = chain.deploy(key)  # type: ignore[attr-defined]
    return EvmLedger(chain, address, key, from_block=block)  # type: ignore[arg-type]


def test_users_ask_for_refunds_through_the_ledger_service(tmp_path: Path) -> None:
    from service_server import serving

    from teeshard.ledger.remote import RemoteLedger

    direct = SqlLedger.open(f"sqlite:///{tmp_path / 'ledger.db'}", "owner")
    alice, mallory = "0x" + "a1" * 20, "0x" + "b2" * 20
    for account in (alice, mallory):
        direct.credit_escrow(account, 100, f"escrow:{account}:0")
    with serving(direct.engines) as base_url:
        as_alice = RemoteLedger(base_url, direct.add_actor_key(alice))
        as_mallory = RemoteLedger(base_url, direct.add_actor_key(mallory))
        with pytest.raises(Unauthorized):
            as_mallory.request_refund(alice)  # only alice (or the owner) asks for hers
        as_alice.request_refund(alice)
        as_alice.close()
        as_mallory.close()
    batch = direct.pay_out_epoch(0, "0x" + "cc" * 20)
    assert dict(batch.refunds) == {alice: 100} and not batch.earnings
    assert direct.balance(alice).available == 0 and direct.balance(mallory).available == 100
    assert direct.check().ok
    direct.close()
