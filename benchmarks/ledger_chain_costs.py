"""Gas per paid request and the wait before the first token: the parts of ledger_charges.py
that compare today's per-request EVM path with epoch settlement (see that script)."""

from __future__ import annotations

import os
import random
import socket
import statistics
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from eth_account.signers.local import LocalAccount

from teeshard.attest.identity import NodeIdentity
from teeshard.ledger.claims import AttestedNode, sign_claim
from teeshard.ledger.evm import Chain, EvmLedger
from teeshard.ledger.evm.chain import new_key
from teeshard.ledger.evm.contract import chain_id_of
from teeshard.ledger.evm.settlement import EpochSettler, claim, deposit_escrow
from teeshard.ledger.interface import Ledger, NodeInfo
from teeshard.ledger.keys import hash_api_key

COST = 20  # tokens a request costs (settled); 30 reserved
HASH = "f" * 64


@dataclass(frozen=True)
class EpochGas:
    requests: int
    epoch_gas: int  # post_epoch + one claim per operator
    gas_per_request: float


@dataclass(frozen=True)
class GasReport:
    operators: int
    reserve_gas: int
    settle_gas: int
    per_request_gas: int
    post_epoch_gas: int
    claim_gas_mean: float
    withdraw_gas: int
    epochs: list[EpochGas]


@dataclass(frozen=True)
class LatencyRow:
    ledger: str
    samples: int
    reserve_p50_s: float
    reserve_max_s: float
    settle_p50_s: float


def _last_gas(chain: Chain) -> int:
    block = chain.w3.eth.get_block("latest")
    tx = block["transactions"][-1]
    return int(chain.w3.eth.get_transaction_receipt(tx)["gasUsed"])


def _request_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"  # the entry node's id format


def _funded(chain: Chain, n: int) -> list[LocalAccount]:
    keys = [new_key() for _ in range(n)]
    for key in keys:
        chain.fund(key.address, 10**21)
    return keys


def measure_gas(operators: int, epochs: list[int]) -> GasReport:
    """On the in-process EVM (gas is the same on any EVM chain with the same rules)."""
    chain = Chain.tester()
    owner_key, customer, entry_key, settler_key, *op_keys = _funded(chain, 4 + operators)
    address, block = chain.deploy(owner_key)
    owner = EvmLedger(chain, address, owner_key, from_block=block)
    owner.as_key(customer).open_account(customer.address)
    owner.deposit(customer.address, 10**9)
    owner.authorize_entry(entry_key.address)
    owner.authorize_settler(settler_key.address)
    ops = []
    for i, key in enumerate(op_keys):
        as_op = owner.as_key(key)
        as_op.open_account(key.address)
        as_op.register_node(NodeInfo(f"node-{i}", f"http://n:{i}", HASH))
        owner.admit_node(f"node-{i}", HASH)
        ops.append(as_op)
    entry = owner.as_key(entry_key)

    # Today: a reserve and a settle transaction per request (steady state: after one).
    reserves, settles = [], []
    for _ in range(6):
        rid = _request_id()
        entry._transact("reserve", chain_id_of(rid), customer.address, 30, rid)
        reserves.append(_last_gas(chain))
        entry._transact("settle", chain_id_of(rid), COST, [chain_id_of("node-0")], [64])
        settles.append(_last_gas(chain))
    reserve_gas, settle_gas = int(statistics.mean(reserves[1:])), int(statistics.mean(settles[1:]))

    # Epoch settlement: charges happen off chain; per epoch one root and a claim per operator.
    deposit_escrow(owner.as_key(customer), customer.address, 10**8)
    settler = EpochSettler(owner.as_key(settler_key))
    anyone = owner.as_key(settler_key)
    rows: list[EpochGas] = []
    claims: list[int] = []
    post = 0
    for requests in [epochs[0], *epochs]:  # the first is a warm-up (first-ever claims)
        earned = {op.actor: 0 for op in ops}
        for r in range(requests):  # what the SQL ledger would have credited
            earned[ops[r % len(ops)].actor] += COST
        epoch = settler.settle(earned)
        post = _last_gas(chain)
        gas = post
        claims.clear()
        for op in ops:
            claim(anyone, epoch.claim(op.actor))
            claims.append(_last_gas(chain))
            gas += claims[-1]
        rows.append(EpochGas(requests, gas, gas / requests))
    ops[0].withdraw()
    withdraw = _last_gas(chain)
    if not owner.check().ok:
        raise SystemExit("the ledger is inconsistent after the gas run")
    return GasReport(
        operators,
        reserve_gas,
        settle_gas,
        reserve_gas + settle_gas,
        post,
        statistics.mean(claims),
        withdraw,
        rows[1:],
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _timed(
    entry: Ledger,
    account: str,
    samples: int,
    block_time_s: float = 0.0,
    key_hash: str | None = None,  # the user's authorisation (the SQL ledger checks it)
) -> tuple[list[float], list[float]]:
    """Reserve and settle ``samples`` requests, each arriving at a random moment of a block."""
    reserve, settle = [], []
    rng = random.Random(0)
    for _ in range(samples):
        time.sleep(rng.uniform(0, block_time_s))
        rid = _request_id()
        start = time.perf_counter()
        entry.reserve(rid, account, 30, key_hash=key_hash)
        reserve.append(time.perf_counter() - start)
        start = time.perf_counter()
        entry.settle(rid, COST, {"node-0": 64})
        settle.append(time.perf_counter() - start)
    return reserve, settle


def _row(name: str, reserve: list[float], settle: list[float]) -> LatencyRow:
    return LatencyRow(
        name, len(reserve), statistics.median(reserve), max(reserve), statistics.median(settle)
    )


def _evm_entry(chain: Chain) -> tuple[Ledger, str]:
    owner_key, customer, entry_key, op_key = _funded(chain, 4)
    address, block = chain.deploy(owner_key)
    owner = EvmLedger(chain, address, owner_key, from_block=block)
    owner.as_key(customer).open_account(customer.address)
    owner.deposit(customer.address, 10**6)
    as_op = owner.as_key(op_key)
    as_op.open_account(op_key.address)
    as_op.register_node(NodeInfo("node-0", "http://n:0", HASH))
    owner.admit_node("node-0", HASH)
    owner.authorize_entry(entry_key.address)
    return owner.as_key(entry_key), customer.address


def measure_latency(root: Path, samples: int) -> list[LatencyRow]:
    from teeshard.ledger import anvil
    from teeshard.ledger.sql import SqlLedger

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        sql = SqlLedger.open(f"sqlite:///{tmp}/ledger.db", "owner")
        for name in ("customer", "operator"):
            sql.open_account(name)
        sql.deposit("customer", 10**6)
        sql.add_api_key("customer", "tsk_customer")
        # node-0's attested key claims it for its operator (teeshard.ledger.claims)
        node_claim = sign_claim(NodeIdentity.generate(), "operator", "node-0", sql.ledger_id(),
                                os.urandom(32))  # fmt: skip
        info = NodeInfo("node-0", "http://n:0", HASH)
        sql.as_actor("operator").register_node(info, claim=node_claim)
        sql.admit_node("node-0", HASH, attested=AttestedNode(info.url, node_claim))
        sql.authorize_entry("entry")
        timed = _timed(sql.as_actor("entry"), "customer", 50, key_hash=hash_api_key("tsk_customer"))
        rows.append(_row("sqlite (epoch settlement)", *timed))
        sql.close()
        binary = anvil.find_anvil(root)
        if binary is None:
            print("latency on anvil: skipped (anvil not installed: scripts/services.sh)")
            return rows
        for label, block_time in (
            ("anvil, a block per transaction", None),
            ("anvil, a block every 2 s", 2),
        ):
            state = Path(tmp) / f"state-{block_time}.json"
            started = anvil.start(state, port=_free_port(), anvil=binary, block_time_s=block_time)
            try:
                entry, account = _evm_entry(Chain.connect(started.rpc_url))
                timed = _timed(entry, account, samples, block_time or 0.0)
                rows.append(_row(f"{label} (per request)", *timed))
            finally:
                anvil.stop(state)
    return rows
