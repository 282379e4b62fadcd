"""What charging costs on each ledger backend: rates, gas per request, the wait before a token.

Three parts (``--parts``, default all):

- ``rates``: charges per second. A charge is what one paid request costs the
  ledger: reserve the most it can cost, then settle the real cost and credit
  one serving node. Each backend runs N charges one after another (one entry
  node) and N spread over T threads (T entry nodes charging one account).
- ``gas``: gas per paid request on chain. Per request (today's EVM path): one
  reserve plus one settle transaction. Epoch settlement (the recommended
  path): requests are charged in the SQL ledger, and an epoch costs one
  ``post_epoch`` plus one ``claim`` per operator, whatever the number of
  requests; amortised over epochs of 100 and 1000 requests (``--epochs``).
- ``latency``: the wait before the first token can be generated, i.e. the
  reserve: SQLite, anvil mining on each transaction, and anvil with a block
  every 2 s (a typical L2's block time), where the reserve waits for a block.

Backends without their server (PostgreSQL: $TEESHARD_TEST_POSTGRES_URL; anvil:
the binary) are skipped and say so.

    python benchmarks/ledger_charges.py [--parts rates,gas,latency] [--charges N]
        [--threads T] [--backends sqlite,evm] [--operators K] [--epochs 100,1000]

Prints tables and writes benchmarks/results/ledger_charges.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from teeshard.attest.identity import NodeIdentity
from teeshard.attest.receipts import Receipt, sign_receipt
from teeshard.ledger.claims import AttestedNode, sign_claim
from teeshard.ledger.interface import Ledger, NodeInfo
from teeshard.ledger.keys import hash_api_key
from teeshard.model.layer_range import LayerRange

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ledger_chain_costs import GasReport, LatencyRow, measure_gas, measure_latency

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "ledger_charges.json"
DEFAULT_CHARGES = {"sqlite": 400, "postgres": 400, "evm": 100, "anvil": 200}


@dataclass(frozen=True)
class Setup:
    entries: list[Ledger]  # authorised entry nodes, one per thread
    account: str
    close: Callable[[], None]
    key_hash: str | None = None  # the customer's authorisation (SQL checks it)
    node: NodeIdentity | None = None  # node-1's attested key: its receipts credit its work


NODE_LAYERS = LayerRange(0, 2)  # node-1 serves the whole (two-layer) model


def _register(owner: Ledger, as_operator: Ledger, operator: str) -> NodeIdentity:
    """node-1, registered and admitted with the claim its attested key signs."""
    node = NodeIdentity.generate()
    info = NodeInfo("node-1", "http://n:1", "f" * 64, "m", str(NODE_LAYERS))
    claim = sign_claim(node, operator, "node-1", owner.ledger_id(), os.urandom(32))
    as_operator.register_node(info, claim=claim)
    owner.admit_node("node-1", "f" * 64, attested=AttestedNode(info.url, claim))
    return node


def _receipts(node: NodeIdentity | None, request_id: str) -> list[Receipt]:
    if node is None:
        return []
    digest = hashlib.sha256(request_id.encode()).digest()
    return [sign_receipt(node, request_id=request_id, stage=0, layers=NODE_LAYERS, model_layers=0, positions=1,
                         manifest_hash=b"\xff" * 32, received_sha256=digest,
                         sent_sha256=digest, previous=None)]  # fmt: skip


@dataclass(frozen=True)
class Row:
    backend: str
    mode: str  # sequential | concurrent
    threads: int
    charges: int
    seconds: float
    charges_per_s: float


def _sql(url: str, threads: int, funds: int) -> Setup:
    from teeshard.ledger.sql import SqlLedger

    owner = SqlLedger.open(url, "owner")
    for name in ("customer", "operator"):
        owner.open_account(name)
    owner.deposit("customer", funds)
    owner.add_api_key("customer", "tsk_customer")
    node = _register(owner, owner.as_actor("operator"), "operator")
    entries = []
    for i in range(threads):
        owner.authorize_entry(f"entry-{i}")
        entries.append(owner.as_actor(f"entry-{i}"))
    return Setup(entries, "customer", owner.close, hash_api_key("tsk_customer"), node)


def _evm(chain: object, threads: int, funds: int) -> Setup:
    from teeshard.ledger.evm import EvmLedger
    from teeshard.ledger.evm.chain import new_key

    keys = [new_key() for _ in range(threads + 3)]
    for key in keys:
        chain.fund(key.address, 10**19)  # type: ignore[attr-defined]
    owner_key, customer, operator, *entry_keys = keys
    address, block = chain.deploy(owner_key)  # type: ignore[attr-defined]
    owner = EvmLedger(chain, address, owner_key, from_block=block)  # type: ignore[arg-type]
    owner.as_key(customer).open_account(customer.address)
    owner.deposit(customer.address, funds)
    as_operator = owner.as_key(operator)
    as_operator.open_account(operator.address)
    _register(owner, as_operator, operator.address)
    entries = []
    for key in entry_keys:
        owner.authorize_entry(key.address)
        entries.append(owner.as_key(key))
    return Setup(entries, customer.address, lambda: None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def backend(name: str, threads: int, funds: int) -> Iterator[Setup | str]:
    """A fresh ledger with its entries, or the reason it is skipped."""
    with tempfile.TemporaryDirectory() as tmp:
        if name == "sqlite":
            setup = _sql(f"sqlite:///{tmp}/ledger.db", threads, funds)
        elif name == "postgres":
            url = os.environ.get("TEESHARD_TEST_POSTGRES_URL")
            if not url:
                yield "no TEESHARD_TEST_POSTGRES_URL (scripts/services.sh)"
                return
            sys.path.insert(0, str(ROOT / "tests" / "ledger"))
            from ledger_harness import reset_postgres

            reset_postgres(url)
            setup = _sql(url, threads, funds)
        elif name == "evm":
            from teeshard.ledger.evm import Chain

            setup = _evm(Chain.tester(), threads, funds)
        elif name == "anvil":
            from teeshard.ledger import anvil
            from teeshard.ledger.evm import Chain

            binary = anvil.find_anvil(ROOT)
            if binary is None:
                yield "anvil not installed (scripts/services.sh)"
                return
            state = Path(tmp) / "state.json"
            chain = anvil.start(state, port=_free_port(), anvil=binary)
            try:
                setup = _evm(Chain.connect(chain.rpc_url), threads, funds)
                yield setup
            finally:
                anvil.stop(state)
            return
        else:
            raise ValueError(name)
        try:
            yield setup
        finally:
            setup.close()


def run_charges(setup: Setup, charges: int, threads: int, tag: str) -> float:
    def one(i: int) -> None:
        ledger = setup.entries[i % threads]
        request_id = f"{tag}-{i}"
        ledger.reserve(request_id, setup.account, 30, key_hash=setup.key_hash, max_tokens=64)
        ledger.settle(request_id, 20, {"node-1": 64}, receipts=_receipts(setup.node, request_id))

    start = time.perf_counter()
    if threads == 1:
        for i in range(charges):
            one(i)
    else:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(one, range(charges)))
    return time.perf_counter() - start


def run_rates(
    backends: list[str], charges_arg: int | None, threads: int
) -> tuple[list[Row], dict[str, str]]:
    rows: list[Row] = []
    skipped: dict[str, str] = {}
    for name in backends:
        charges = charges_arg or DEFAULT_CHARGES[name]
        with backend(name, threads, funds=charges * 2 * 30) as setup:
            if isinstance(setup, str):
                skipped[name] = setup
                print(f"{name}: skipped: {setup}", file=sys.stderr)
                continue
            run_charges(setup, 5, 1, "warm")
            for mode, t in (("sequential", 1), ("concurrent", threads)):
                seconds = run_charges(setup, charges, t, mode)
                rows.append(Row(name, mode, t, charges, seconds, charges / seconds))
            check = setup.entries[0].check()
            if not check.ok:
                raise SystemExit(f"{name}: the ledger is inconsistent after the run: {check}")
    print(
        f"{'backend':10} {'mode':11} {'threads':>7} {'charges':>8} {'seconds':>8} {'charges/s':>10}"
    )
    for r in rows:
        print(
            f"{r.backend:10} {r.mode:11} {r.threads:7d} {r.charges:8d} {r.seconds:8.2f} "
            f"{r.charges_per_s:10.1f}"
        )
    return rows, skipped


def print_gas(report: GasReport) -> None:
    print()
    print(f"gas per paid request ({report.operators} operators, one node each)")
    print(f"{'path':34} {'requests':>8} {'gas/epoch':>10} {'gas/request':>12} {'vs today':>9}")
    today = report.per_request_gas
    print(f"{'per request: reserve + settle':34} {1:8d} {today:10d} {today:12,d} {1:9.2f}")
    for row in report.epochs:
        print(
            f"{'epoch: post_epoch + claims':34} {row.requests:8d} {row.epoch_gas:10d} "
            f"{row.gas_per_request:12,.0f} {row.gas_per_request / today:9.4f}"
        )
    print(
        f"(reserve {report.reserve_gas:,}, settle {report.settle_gas:,}; post_epoch "
        f"{report.post_epoch_gas:,}, claim {report.claim_gas_mean:,.0f} on average, "
        f"withdraw {report.withdraw_gas:,}; the issue measured 267,969 per request)"
    )


def print_latency(rows: list[LatencyRow]) -> None:
    print()
    print("wait before the first token (the reserve), and after the last (the settle)")
    print(
        f"{'ledger':46} {'n':>3} {'reserve p50 s':>13} {'reserve max s':>13} {'settle p50 s':>12}"
    )
    for r in rows:
        print(
            f"{r.ledger:46} {r.samples:3d} {r.reserve_p50_s:13.4f} {r.reserve_max_s:13.4f} "
            f"{r.settle_p50_s:12.4f}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="rates,gas,latency")
    parser.add_argument("--backends", default="sqlite,postgres,evm,anvil")
    parser.add_argument("--charges", type=int, default=None, help="per run (default per backend)")
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--operators", type=int, default=4, help="operators paid per epoch")
    parser.add_argument("--epochs", default="100,1000", help="requests per epoch")
    parser.add_argument("--latency-samples", type=int, default=5)
    args = parser.parse_args(argv)
    parts = set(args.parts.split(","))
    out: dict[str, object] = {
        "benchmark": "ledger_charges",
        "charge": "reserve + settle (crediting one node)",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
    }
    if "rates" in parts:
        rows, skipped = run_rates(args.backends.split(","), args.charges, args.threads)
        out["rows"] = [asdict(r) for r in rows]
        out["skipped"] = skipped
    if "gas" in parts:
        report = measure_gas(args.operators, [int(n) for n in args.epochs.split(",")])
        print_gas(report)
        out["gas"] = asdict(report)
    if "latency" in parts:
        latency = measure_latency(ROOT, args.latency_samples)
        print_latency(latency)
        out["latency"] = [asdict(r) for r in latency]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=2))
    print(f"wrote {RESULTS.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
