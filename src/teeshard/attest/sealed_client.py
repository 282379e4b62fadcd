"""A client for sealed requests: verify the entry node once, then seal every request to it.

The API key travels inside the seal, never as a header, so a TLS-terminating
ingress sees no credential; each request carries a fresh timestamp and request
id, so a captured one cannot be replayed; the answer streams back as sealed
records, opened in order as they arrive (:mod:`teeshard.attest.sealed_stream`).
"""

from __future__ import annotations

import json
import secrets
import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx

from teeshard.attest.client import NONCE_BYTES, fetch_bundle
from teeshard.attest.errors import SealedRequestRefused
from teeshard.attest.sealed_stream import ResponseReader, SealedResponse
from teeshard.attest.sealing import SEALED_CONTENT_TYPE, SEALED_PATH, seal_request
from teeshard.attest.verify.bundle import VerifiedNode, verify_bundle
from teeshard.attest.verify.policy import Policy
from teeshard.attest.verify.quote import Collateral, CollateralSource


class SealedAnswer:
    """An answer being streamed: ``status``, ``content_type``, then :meth:`iter_bytes`."""

    def __init__(self, response: httpx.Response, reader: ResponseReader) -> None:
        self._response = response
        self._reader = reader
        self._pending: list[bytes] = []
        self._chunks = response.iter_bytes()
        while reader.status is None:  # read up to the head record
            chunk = next(self._chunks, None)
            if chunk is None:
                reader.close()  # raises: cut short before the head
            else:
                self._pending += list(reader.feed(chunk))

    @property
    def status(self) -> int:
        assert self._reader.status is not None
        return self._reader.status

    @property
    def content_type(self) -> str:
        assert self._reader.content_type is not None
        return self._reader.content_type

    def iter_bytes(self) -> Iterator[bytes]:
        """The answer's data in order; SealingError if tampered, reordered or cut short."""
        yield from self._pending
        self._pending = []
        for chunk in self._chunks:
            yield from self._reader.feed(chunk)
        self._reader.close()

    def read(self) -> bytes:
        return b"".join(self.iter_bytes())


class SealedClient:
    """Verify an entry node's bundle, then send it HPKE-sealed requests.

    ``api_key`` is sealed into every request. ``pin_tls`` also pins the attested
    TLS certificate for https URLs; leave it off behind a TLS-terminating ingress
    (the sealing alone keeps the ingress blind).
    """

    def __init__(
        self,
        base_url: str,
        policy: Policy,
        *,
        api_key: str | None = None,
        expected_manifest_hash: bytes | None = None,
        collateral: Collateral | CollateralSource | None = None,
        http: httpx.Client | None = None,
        pin_tls: bool = False,
        timeout: float = 120.0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.policy = policy
        self.api_key = api_key
        self.expected_manifest_hash = expected_manifest_hash
        self.collateral = collateral
        self.pin_tls = pin_tls
        self.timeout = timeout
        self._http = http
        self._owns_http = http is None
        self.node: VerifiedNode | None = None

    def verify(self) -> VerifiedNode:
        """Fetch and verify the bundle (once); every request is sealed to this node."""
        if self.node is None:
            nonce = secrets.token_bytes(NONCE_BYTES)
            bundle = fetch_bundle(self.base_url, nonce, client=self._http, timeout=self.timeout)
            self.node = verify_bundle(
                bundle, self.policy, nonce=nonce, collateral=self.collateral,
                expected_manifest_hash=self.expected_manifest_hash,
            )  # fmt: skip
            if self._http is None:
                verify: ssl.SSLContext | bool = True
                if self.pin_tls and self.base_url.startswith("https://"):
                    verify = self.node.pinned_ssl_context()
                self._http = httpx.Client(verify=verify, timeout=self.timeout)
        return self.node

    @contextmanager
    def stream(self, path: str, body: bytes) -> Iterator[SealedAnswer]:
        """Send one sealed request; the answer opens record by record as it streams in."""
        node = self.verify()
        assert self._http is not None
        sealed, reader = seal_request(
            node.fingerprint, node.sealing_public_key, path, body, api_key=self.api_key
        )
        headers = {"content-type": SEALED_CONTENT_TYPE}
        with self._http.stream("POST", self.base_url + SEALED_PATH, content=sealed,
                               headers=headers) as response:  # fmt: skip
            if response.status_code != 200:
                response.read()
                message, code = _reason(response)
                raise SealedRequestRefused(
                    f"sealed request refused: HTTP {response.status_code}: {message}",
                    response.status_code, code,
                )  # fmt: skip
            yield SealedAnswer(response, reader)

    def request(self, path: str, body: bytes) -> SealedResponse:
        with self.stream(path, body) as answer:
            data = answer.read()
            return SealedResponse(answer.status, answer.content_type, data)

    def post_json(self, path: str, payload: Any) -> tuple[int, Any]:
        """Seal a JSON request; return the (status, decoded JSON body) of the sealed answer."""
        answer = self.request(path, json.dumps(payload).encode())
        return answer.status, json.loads(answer.body) if answer.body else None

    def close(self) -> None:
        if self._owns_http and self._http is not None:
            self._http.close()
            self._http = None


def _reason(response: httpx.Response) -> tuple[str, str | None]:
    try:
        error = response.json()["error"]
        return str(error["message"]), error.get("code")
    except (ValueError, KeyError, TypeError, AttributeError):
        return response.text[:200], None
