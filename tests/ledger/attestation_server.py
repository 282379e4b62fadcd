"""A node's attestation endpoint on loopback, serving bundles signed with a real key.

Stands in for a node of the attestation issue: ``GET /v1/attestation?nonce=HEX``
returns a JSON bundle whose nonce signature is made with the private key of the
certificate it carries. Tests change ``behaviour`` to serve bad bundles.
"""

from __future__ import annotations

import datetime
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def _certificate(key: ec.EllipticCurvePrivateKey) -> str:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "teeshard-node")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    return cert.public_bytes(serialization.Encoding.PEM).decode()


@dataclass
class FakeNode:
    manifest_hash: str
    provider: str = "simulated"
    node_id: str | None = None
    behaviour: str = "good"  # good | bad-signature | wrong-nonce | no-signature | http-404
    key: ec.EllipticCurvePrivateKey = field(
        default_factory=lambda: ec.generate_private_key(ec.SECP256R1())
    )
    url: str = ""

    def bundle(self, nonce: bytes) -> dict[str, Any]:
        signed = nonce if self.behaviour != "bad-signature" else b"something else"
        echoed = nonce if self.behaviour != "wrong-nonce" else b"\x00" * 32
        bundle: dict[str, Any] = {
            "provider": self.provider,
            "nonce": echoed.hex(),
            "quote": "" if self.provider == "simulated" else "00" * 64,
            "manifest": {"model": "tiny", "layers": [0, 2], "hash": self.manifest_hash},
            "certificate": _certificate(self.key),
            "nonce_signature": self.key.sign(signed, ec.ECDSA(hashes.SHA256())).hex(),
        }
        if self.node_id:
            bundle["node_id"] = self.node_id
        if self.behaviour == "no-signature":
            del bundle["nonce_signature"]
        return bundle


@contextmanager
def serve(node: FakeNode) -> Iterator[FakeNode]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            parts = urlsplit(self.path)
            if parts.path != "/v1/attestation" or node.behaviour == "http-404":
                self.send_error(404)
                return
            nonce = bytes.fromhex(parse_qs(parts.query)["nonce"][0])
            body = json.dumps(node.bundle(nonce)).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            return None

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    node.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield node
    finally:
        server.shutdown()
        server.server_close()
