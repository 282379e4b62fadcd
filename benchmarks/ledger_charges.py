"""Charges per second for each ledger backend.

A charge is what one paid request costs the ledger: reserve the most it can
cost, then settle the real cost and credit one serving node. Each backend runs
N charges one after another (one entry node) and N spread over T threads (T
entry nodes charging one account: the contended case). Backends without their
server (PostgreSQL: $TEESHARD_TEST_POSTGRES_URL; anvil: the binary) are skipped
and say so.

    python benchmarks/ledger_charges.py [--charges N] [--threads T] [--backends sqlite,evm]

Prints a table and writes benchmarks/results/ledger_charges.json.
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
    return [sign_receipt(node, request_id=request_id, stage=0, layers=NODE_LAYERS,
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="sqlite,postgres,evm,anvil")
    parser.add_argument("--charges", type=int, default=None, help="per run (default per backend)")
    parser.add_argument("--threads", type=int, default=8)
    args = parser.parse_args(argv)
    rows: list[Row] = []
    skipped: dict[str, str] = {}
    for name in args.backends.split(","):
        charges = args.charges or DEFAULT_CHARGES[name]
        with backend(name, args.threads, funds=charges * 2 * 30) as setup:
            if isinstance(setup, str):
                skipped[name] = setup
                print(f"{name}: skipped: {setup}", file=sys.stderr)
                continue
            run_charges(setup, 5, 1, "warm")
            for mode, threads in (("sequential", 1), ("concurrent", args.threads)):
                seconds = run_charges(setup, charges, threads, mode)
                rows.append(Row(name, mode, threads, charges, seconds, charges / seconds))
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
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "benchmark": "ledger_charges",
                "charge": "reserve + settle (crediting one node)",
                "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
                "rows": [asdict(r) for r in rows],
                "skipped": skipped,
            },
            indent=2,
        )
    )
    print(f"wrote {RESULTS.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
