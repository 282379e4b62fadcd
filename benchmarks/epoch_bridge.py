"""What the bridge between the SQL ledger and epoch settlement costs, end to end.

On the in-process EVM (py-evm) and a SQLite ledger: D users escrow on chain,
``sync_escrow`` credits them (and a rescan credits nothing), N paid requests are
charged in SQL (reserve + settle with receipts, K operators' nodes), then
``settle_epoch`` distributes, pays out and posts the root, and each operator
claims. Reports the time of each step, the gas of the epoch and of the claims,
and the gas per paid request amortised over the epoch.

    python benchmarks/epoch_bridge.py [--deposits D] [--requests N] [--operators K]

Prints a table and writes benchmarks/results/epoch_bridge.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import tempfile
import time
from pathlib import Path

from teeshard.attest.identity import NodeIdentity
from teeshard.attest.receipts import Receipt, sign_receipt
from teeshard.ledger.claims import AttestedNode, sign_claim
from teeshard.ledger.epochs import EpochBridge
from teeshard.ledger.evm import Chain, EvmLedger
from teeshard.ledger.evm.chain import new_key
from teeshard.ledger.evm.settlement import deposit_escrow
from teeshard.ledger.interface import NodeInfo
from teeshard.ledger.keys import hash_api_key
from teeshard.ledger.sql import SqlLedger
from teeshard.model.layer_range import LayerRange

RESULTS = Path(__file__).with_name("results")


def gas_between(chain: Chain, first: int, last: int) -> int:
    total = 0
    for number in range(first, last + 1):
        for tx in chain.w3.eth.get_block(number)["transactions"]:
            total += int(chain.w3.eth.get_transaction_receipt(tx)["gasUsed"])  # type: ignore[arg-type]
    return total


def receipts_for(request_id: str, entry: NodeIdentity, node: NodeIdentity) -> list[Receipt]:
    data = hashlib.sha256(request_id.encode()).digest()
    out: list[Receipt] = []
    for index, (identity, layers, manifest) in enumerate(
        ((entry, LayerRange(0, 1), "e" * 64), (node, LayerRange(1, 2), "c" * 64))
    ):
        sent = hashlib.sha256(data + bytes([index])).digest()
        out.append(
            sign_receipt(
                identity, request_id=request_id, stage=index, layers=layers, model_layers=2, positions=1,
                manifest_hash=bytes.fromhex(manifest), received_sha256=data, sent_sha256=sent,
                previous=out[-1] if out else None,
            )
        )  # fmt: skip
        data = sent
    return out


def run(deposits: int, requests: int, operators: int, workdir: Path) -> dict[str, float]:
    chain = Chain.tester()
    owner_key, settler_key = new_key(), new_key()
    for key in (owner_key, settler_key):
        chain.fund(key.address, 10**21)
    address, block = chain.deploy(owner_key)
    owner = EvmLedger(chain, address, owner_key, from_block=block)
    owner.authorize_settler(settler_key.address)
    settler = owner.as_key(settler_key)
    users = []
    for _ in range(deposits):
        key = new_key()
        chain.fund(key.address, 10**19)
        deposit_escrow(owner.as_key(key), key.address, 1000)
        users.append(str(key.address))
    sql = SqlLedger.open(f"sqlite:///{workdir / 'ledger.db'}", "owner")
    sql.authorize_entry("entry-1")
    bridge = EpochBridge(sql, settler, workdir / "epochs")
    out: dict[str, float] = {}
    t = time.perf_counter()
    synced = bridge.sync_escrow()
    out["sync_ms_per_deposit"] = (time.perf_counter() - t) * 1000 / deposits
    assert len(synced.credited) == deposits
    sql.set_bridge_state(f"escrow_block:{address}", str(block))
    t = time.perf_counter()
    assert bridge.sync_escrow().credited == ()
    out["rescan_ms_per_deposit"] = (time.perf_counter() - t) * 1000 / deposits
    entry_identity = NodeIdentity.generate()
    nodes = []
    for i in range(operators):
        key, identity = new_key(), NodeIdentity.generate()
        operator = str(key.address)
        sql.open_account(operator)
        info = NodeInfo(f"node-{i}", f"http://node-{i}:8000", "c" * 64, "m", "1:2")
        as_op = sql.as_actor(operator)
        as_op.register_node(info, claim=sign_claim(identity, operator, info.node_id,
                                                   sql.ledger_id(), b"n" * 32))  # fmt: skip
        claim = sign_claim(identity, operator, info.node_id, sql.ledger_id(), b"m" * 32)
        sql.admit_node(info.node_id, info.manifest_hash, attested=AttestedNode(info.url, claim))
        nodes.append((info.node_id, identity, operator))
    for account in users:
        sql.add_api_key(account, f"tsk_{account}")
    entry = sql.as_actor("entry-1")
    t = time.perf_counter()
    for r in range(requests):
        account = users[r % deposits]
        node_id, identity, _ = nodes[r % operators]
        rid = f"r{r}"
        entry.reserve(rid, account, 50, key_hash=hash_api_key(f"tsk_{account}"), max_tokens=30)
        entry.settle(rid, 40, {node_id: 30}, receipts=receipts_for(rid, entry_identity, identity))
    out["sql_charge_ms"] = (time.perf_counter() - t) * 1000 / requests
    first = int(chain.w3.eth.block_number) + 1
    t = time.perf_counter()
    result = bridge.settle_epoch()
    out["settle_epoch_ms"] = (time.perf_counter() - t) * 1000
    epoch_gas = gas_between(chain, first, int(chain.w3.eth.block_number))
    assert result.batch is not None and len(result.batch.earnings) == operators
    first = int(chain.w3.eth.block_number) + 1
    t = time.perf_counter()
    paid = sum(bridge.claim(operator) for _, _, operator in nodes)
    out["claims_ms"] = (time.perf_counter() - t) * 1000
    claims_gas = gas_between(chain, first, int(chain.w3.eth.block_number))
    assert paid == result.batch.total == requests * 20
    check = sql.check()
    assert check.ok and owner.check().ok, check
    out.update(
        epoch_gas=epoch_gas,
        claims_gas=claims_gas,
        gas_per_request=(epoch_gas + claims_gas) / requests,
        paid_out=paid,
    )
    sql.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--deposits", type=int, default=20)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--operators", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = run(args.deposits, args.requests, args.operators, Path(tmp))
    print(f"epoch bridge: {args.deposits} escrow deposits, {args.requests} requests, "
          f"{args.operators} operators (SQLite + in-process EVM)")  # fmt: skip
    print(f"{'measure':<28}{'value':>14}")
    for name, value in out.items():
        print(f"{name:<28}{value:>14,.2f}")
    RESULTS.mkdir(exist_ok=True)
    record = {"args": vars(args), "machine": platform.platform(), "results": out}
    (RESULTS / "epoch_bridge.json").write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
