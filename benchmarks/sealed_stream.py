"""What sealing costs: sealed requests opened per second, and sealed stream records.

A sealed request costs the node one HPKE open (an X25519 agreement) plus the
replay check; each streamed chunk of the answer costs one AES-GCM seal on the
node and one open on the client, and its padding to a bucket. This measures
both on this CPU, for chunk sizes of SSE events (one token's delta is ~150 B),
and reports the bytes on the wire per data byte.

    python benchmarks/sealed_stream.py [--requests N] [--records N]

Prints a table and writes benchmarks/results/sealed_stream.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

from teeshard.attest import (
    NodeIdentity,
    ReplayCache,
    open_request,
    seal_request,
)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "sealed_stream.json"
CHUNK_SIZES = (150, 1000, 16000, 60000)


def bench_requests(identity: NodeIdentity, count: int) -> dict[str, float]:
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "x" * 500}]})
    key, path = "tsk_" + "k" * 40, "/v1/chat/completions"
    public = identity.sealing_public_key
    sealed = [
        seal_request(identity.fingerprint, public, path, body.encode(), api_key=key)[0]
        for _ in range(count)
    ]
    cache = ReplayCache(120, max_entries=count + 1)
    started = time.perf_counter()
    for item in sealed:
        opened = open_request(identity, item)
        cache.admit(opened.request_id, opened.timestamp, time.time())
    elapsed = time.perf_counter() - started
    return {"requests": count, "opened_per_s": count / elapsed, "us_each": elapsed / count * 1e6,
            "overhead_bytes": len(sealed[0]) - len(body)}  # fmt: skip


def bench_records(identity: NodeIdentity, size: int, count: int) -> dict[str, float]:
    sealed, reader = seal_request(identity.fingerprint, identity.sealing_public_key, "/p", b"")
    sealer = open_request(identity, sealed).response_sealer()
    data = b"d" * size
    wire = [sealer.head(200, "text/event-stream")]
    started = time.perf_counter()
    wire += [sealer.data(data) for _ in range(count)]
    sealed_s = time.perf_counter() - started
    wire.append(sealer.final())
    started = time.perf_counter()
    opened = sum(len(chunk) for record in wire for chunk in reader.feed(record))
    reader.close()
    opened_s = time.perf_counter() - started
    assert opened == size * count
    wire_bytes = sum(len(r) for r in wire[1:-1]) / count
    return {"chunk_bytes": size, "records": count, "seal_us": sealed_s / count * 1e6,
            "open_us": opened_s / count * 1e6, "wire_per_data_byte": wire_bytes / size}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--records", type=int, default=5000)
    args = parser.parse_args()
    identity = NodeIdentity.generate(hosts=["localhost"])
    requests = bench_requests(identity, args.requests)
    records = [bench_records(identity, size, args.records) for size in CHUNK_SIZES]
    print(f"sealed requests: {requests['opened_per_s']:.0f}/s opened + replay-checked "
          f"({requests['us_each']:.0f} us each), {requests['overhead_bytes']} bytes of overhead")  # fmt: skip
    print(f"{'chunk bytes':>12} {'seal us':>9} {'open us':>9} {'wire/data':>10}")
    for row in records:
        print(f"{row['chunk_bytes']:>12} {row['seal_us']:>9.1f} {row['open_us']:>9.1f} "
              f"{row['wire_per_data_byte']:>10.2f}")  # fmt: skip
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"machine": platform.processor() or platform.machine(),
                                   "requests": requests, "records": records}, indent=2))  # fmt: skip
    print(f"wrote {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
