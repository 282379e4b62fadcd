"""What the attestation checks cost, and how much a hostile endpoint can make a verifier read.

* policy checks on the real DCAP sample quotes (dcap-qvl verification + the policy);
* a whole simulated bundle verified (signature, binding, manifest, pinned key);
* a node's re-key and re-quote (``NodeAttestation.refresh``, simulated provider);
* a hostile loopback server streaming 64 MiB as its "bundle": the bytes it got
  out before the capped fetch refused, and the time to refuse.

    python benchmarks/attestation_checks.py [--repeat N]

Prints a table and writes benchmarks/results/attestation_checks.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import secrets
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from teeshard.attest import (
    FormatError,
    NodeAttestation,
    Policy,
    compute_manifest,
    fetch_bundle,
    verify_bundle,
)
from teeshard.attest.evidence import Evidence
from teeshard.attest.providers.simulated import SimulatedProvider
from teeshard.attest.verify.bundle import check_report
from teeshard.attest.verify.quote import load_collateral, verify_quote
from teeshard.model.checkpoint import Checkpoint
from teeshard.model.layer_range import LayerRange

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "attest" / "data"
RESULTS = ROOT / "benchmarks" / "results" / "attestation_checks.json"
VECTOR_TIME = 1751000000
FLOOD = 64 << 20


def median_ms(run: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def quote_checks(repeat: int) -> dict[str, float]:
    out = {}
    for name in ("tdx_quote", "sgx_quote"):
        quote = (DATA / name).read_bytes()
        collateral = load_collateral(DATA / f"{name}_collateral.json")
        report = verify_quote(quote, collateral, VECTOR_TIME)
        policy = Policy(
            allowed_tcb_statuses=frozenset({report.tcb_status}),
            allowed_advisory_ids=frozenset(report.advisory_ids),
            mrtd=frozenset({report.mrtd} if report.mrtd else ()),
            rtmr0=frozenset({report.rtmr0} if report.rtmr0 else ()),
            rtmr1=frozenset({report.rtmr1} if report.rtmr1 else ()),
            rtmr2=frozenset({report.rtmr2} if report.rtmr2 else ()),
            rtmr3=frozenset({report.rtmr3} if report.rtmr3 else ()),
            mrenclave=frozenset({report.mrenclave} if report.mrenclave else ()),
        )
        evidence = Evidence("bench", report.tee_type, quote, report.report_data)

        def run(q: bytes = quote, c: object = collateral, p: Policy = policy,
                e: Evidence = evidence) -> None:  # fmt: skip
            check_report(verify_quote(q, c, VECTOR_TIME), e, p)

        out[f"{report.tee_type} quote: dcap-qvl + policy"] = median_ms(run, repeat)
    return out


def tiny_manifest(tmp: Path):  # type: ignore[no-untyped-def]
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(tmp)
    return compute_manifest(Checkpoint(tmp), LayerRange(0, 2), "float32")


def node_checks(repeat: int, tmp: Path) -> dict[str, float]:
    provider = SimulatedProvider()
    node = NodeAttestation.create(provider, tiny_manifest(tmp / "model"))
    policy = Policy().pinning_simulated(provider.public_key)

    def verify() -> None:
        nonce = secrets.token_bytes(32)
        verify_bundle(node.bundle(nonce), policy, nonce=nonce,
                      expected_manifest_hash=node.manifest.combined_hash)  # fmt: skip

    return {
        "simulated bundle: sign + verify": median_ms(verify, repeat),
        "re-key + re-quote (refresh)": median_ms(node.refresh, max(3, repeat // 10)),
    }


class Flood(BaseHTTPRequestHandler):
    sent = 0

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("connection", "close")
        self.end_headers()
        chunk = b" " * (64 << 10)
        try:
            while Flood.sent < FLOOD:
                self.wfile.write(chunk)
                Flood.sent += len(chunk)
        except OSError:
            pass


def hostile_fetch() -> dict[str, float]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Flood)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    start = time.perf_counter()
    try:
        fetch_bundle(url, bytes(32), timeout=30)
        refused = 0.0
    except FormatError as exc:
        refused = 1.0 if "larger than" in str(exc) else 0.0
    elapsed = (time.perf_counter() - start) * 1000
    time.sleep(0.2)  # let the server notice the closed socket
    server.shutdown()
    server.server_close()
    return {
        "hostile bundle: MiB the server pushed (of 64)": Flood.sent / (1 << 20),
        "hostile bundle: ms until refused": elapsed,
        "hostile bundle: refused by the size cap (1 = yes)": refused,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=50)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = {
            **quote_checks(args.repeat),
            **node_checks(args.repeat, Path(tmp)),
            **hostile_fetch(),
        }
    width = max(map(len, rows))
    print(f"{'measure':<{width}}  value")
    for name, value in rows.items():
        print(f"{name:<{width}}  {value:8.2f}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "machine": platform.platform(), "repeat": args.repeat,
        "unit": "ms unless the name says otherwise", "results": rows,
    }, indent=2))  # fmt: skip
    print(f"wrote {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
