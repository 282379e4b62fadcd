"""What per-segment work credit costs a settle: one route against an answer that failed over.

A settle verifies the receipt of every admitted node it credits (an ECDSA P-256
check each) and splits the cost by layers x the positions each segment added.
Here three admitted nodes (1:3, and two replicas of 3:4) and an entry stage
(0:1): ``one route`` settles one chain (3 receipts, 2 credited); ``failed over``
settles two segments (the first lost its last node: entry and 1:3 signed; the
second is a whole route on the replica: 5 receipts, 3 credited). Each settle is
its own request, reserved first (not timed); the table gives the median and p90
milliseconds of the settle alone.

    python benchmarks/segment_credit.py [--settles N] [--backends sqlite,postgres]

PostgreSQL is $TEESHARD_TEST_POSTGRES_URL (skipped without it). Prints a table
and writes benchmarks/results/segment_credit.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

from teeshard.attest.identity import NodeIdentity
from teeshard.attest.receipts import Receipt, sign_receipt
from teeshard.ledger.claims import AttestedNode, sign_claim
from teeshard.ledger.interface import NodeInfo
from teeshard.ledger.keys import hash_api_key
from teeshard.ledger.sql import SqlLedger
from teeshard.model.layer_range import LayerRange

RESULTS = Path(__file__).parent / "results" / "segment_credit.json"
SLOTS = (("a", "1:3", "aa"), ("b", "3:4", "bb"), ("c", "3:4", "cc"))


def chain(
    request_id: str, stages: list[tuple[NodeIdentity, str, str]], positions: int
) -> list[Receipt]:
    out: list[Receipt] = []
    data = hashlib.sha256(request_id.encode()).digest()
    for index, (identity, layers, manifest) in enumerate(stages):
        sent = hashlib.sha256(data + bytes([index])).digest()
        out.append(sign_receipt(
            identity, request_id=request_id, stage=index, layers=LayerRange.parse(layers),
            model_layers=4, positions=positions, manifest_hash=bytes.fromhex(manifest * 32),
            received_sha256=data, sent_sha256=sent, previous=out[-1] if out else None,
        ))  # fmt: skip
        data = sent
    return out


def run(url: str, settles: int) -> dict[str, dict[str, float]]:
    owner = SqlLedger.open(url, "owner")
    owner.authorize_entry("entry-1")
    entry = owner.as_actor("entry-1")
    owner.open_account("alice")
    owner.deposit("alice", 10**12)
    owner.add_api_key("alice", "tsk_alice")
    nodes = {}
    for name, layers, manifest in SLOTS:
        identity = NodeIdentity.generate()
        owner.open_account(f"op-{name}")
        info = NodeInfo(name, f"http://{name}:8000", manifest * 32, "m", layers)
        claim = sign_claim(identity, f"op-{name}", name, owner.ledger_id(), os.urandom(32))
        owner.as_actor(f"op-{name}").register_node(info, claim=claim)
        owner.admit_node(name, manifest * 32, attested=AttestedNode(info.url, claim))
        nodes[name] = (identity, layers, manifest)
    stage0 = (NodeIdentity.generate(), "0:1", "ee")
    shapes = {
        "one route": lambda r: chain(r, [stage0, nodes["a"], nodes["b"]], 40),
        "failed over": lambda r: (
            chain(r, [stage0, nodes["a"]], 10) + chain(r, [stage0, nodes["a"], nodes["c"]], 40)
        ),
    }
    out = {}
    for shape, receipts_of in shapes.items():
        times = []
        for i in range(settles):
            rid = f"{shape.replace(' ', '-')}-{i}"
            entry.reserve(rid, "alice", 1000, key_hash=hash_api_key("tsk_alice"), max_tokens=64)
            receipts = receipts_of(rid)
            started = time.perf_counter()
            entry.settle(rid, 1000, {"a": 41, "b": 41, "c": 41}, receipts=receipts)
            times.append(1000 * (time.perf_counter() - started))
        times.sort()
        out[shape] = {
            "receipts": len(receipts_of("x")),
            "median_ms": round(statistics.median(times), 2),
            "p90_ms": round(times[int(0.9 * (len(times) - 1))], 2),
        }
    assert owner.check().ok
    owner.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settles", type=int, default=200)
    parser.add_argument("--backends", default="sqlite,postgres")
    args = parser.parse_args()
    results: dict[str, object] = {}
    for backend in args.backends.split(","):
        if backend == "sqlite":
            folder = tempfile.mkdtemp(prefix="segment-credit-")
            url = f"sqlite:///{folder}/ledger.db"
        elif backend == "postgres":
            url = os.environ.get("TEESHARD_TEST_POSTGRES_URL", "")
            if not url:
                print("postgres: skipped ($TEESHARD_TEST_POSTGRES_URL is not set)")
                continue
            sys.path.insert(0, str(Path(__file__).parent.parent / "tests" / "ledger"))
            from ledger_harness import reset_postgres  # the benchmark takes a fresh database

            reset_postgres(url)
        else:
            sys.exit(f"unknown backend {backend!r}")
        results[backend] = run(url, args.settles)
    print(f"{'backend':10} {'shape':12} {'receipts':>8} {'median ms':>10} {'p90 ms':>8}")
    for backend, shapes in results.items():
        assert isinstance(shapes, dict)
        for shape, row in shapes.items():
            print(f"{backend:10} {shape:12} {row['receipts']:>8} {row['median_ms']:>10} "
                  f"{row['p90_ms']:>8}")  # fmt: skip
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"python": platform.python_version(), "settles": args.settles,
                                   "results": results}, indent=1))  # fmt: skip
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
