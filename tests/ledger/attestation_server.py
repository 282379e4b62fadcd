"""A relay on loopback in front of a real node's ``/v1/attestation``, to serve bad bundles.

Every answer starts from the real node's bundle (fetched over its attested,
self-signed TLS); ``behaviour`` then says how the relay spoils it:

good
    pass the node's bundle for the asked nonce through unchanged;
bad-signature
    flip a byte of ``nonce_signature``;
wrong-nonce
    answer with the node's bundle for another nonce (a replayed bundle);
no-certificate
    drop the ``certificate`` field;
http-404
    answer HTTP 404.

``/v1/operator-claim`` is passed on unchanged: a relay can carry a node's claim,
never make one (it names the node's own id and operator).
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import httpx

BEHAVIOURS = ("good", "bad-signature", "wrong-nonce", "no-certificate", "http-404")


@dataclass
class Relay:
    upstream: str  # the real node's http(s) URL
    behaviour: str = "good"
    url: str = ""

    def bundle(self, nonce_hex: str) -> bytes:
        if self.behaviour == "wrong-nonce":
            nonce_hex = os.urandom(32).hex()
        response = httpx.get(
            self.upstream + "/v1/attestation",
            params={"nonce": nonce_hex},
            verify=False,  # the node's certificate is self-signed; the bundle attests it
            timeout=30,
        )
        response.raise_for_status()
        bundle = response.json()
        if self.behaviour == "bad-signature":
            signature = bytearray.fromhex(bundle["nonce_signature"])
            signature[-1] ^= 0x01  # the last byte of s: still well-formed DER
            bundle["nonce_signature"] = signature.hex()
        if self.behaviour == "no-certificate":
            del bundle["certificate"]
        return json.dumps(bundle).encode()


@contextmanager
def relay(upstream: str, behaviour: str = "good") -> Iterator[Relay]:
    if behaviour not in BEHAVIOURS:
        raise ValueError(f"unknown behaviour {behaviour!r}; one of {BEHAVIOURS}")
    state = Relay(upstream.rstrip("/"), behaviour)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            parts = urlsplit(self.path)
            known = ("/v1/attestation", "/v1/operator-claim")
            if parts.path not in known or state.behaviour == "http-404":
                self.send_error(404)
                return
            if parts.path == "/v1/operator-claim":  # passed on as it is
                body = httpx.get(state.upstream + self.path, verify=False, timeout=30).content
            else:
                body = state.bundle(parse_qs(parts.query)["nonce"][0])
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
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
