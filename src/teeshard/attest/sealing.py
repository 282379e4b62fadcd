"""End-to-end sealed requests: HPKE to the entry node's attested X25519 key.

An HTTP ingress outside the TEE (a load balancer, Phala's gateway) then sees only
ciphertext: not the prompt, not the answer, not the API key. HPKE is RFC 9180
base mode, DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, AES-128-GCM, single-shot,
from ``cryptography.hazmat.primitives.hpke``.

Request (client → node, POST :data:`SEALED_PATH`, content type
:data:`SEALED_CONTENT_TYPE`, no Authorization header)::

    HPKE-seal(node sealing key,
              info = "teeshard/sealed-request/v2\\0" || lp(node cert SHA-256),
              plaintext = u64(unix time, s) || lp(request id: 16 random bytes)
                          || lp(response secret: 32 random bytes)
                          || lp(API key, UTF-8; empty: none) || lp(path) || lp(body))

The node refuses a request whose time is more than :data:`WINDOW_S` from its
own clock, and one whose request id it has seen within that window
(:class:`~teeshard.attest.replay.ReplayCache`): a captured request cannot be
replayed. The request's *digest*, SHA-256 of the sealed bytes, is its billing
idempotency key. The response secret, known only to the client and the attested
node, keys the answer's sealed stream (:mod:`teeshard.attest.sealed_stream`).
Any tampering makes opening fail with :class:`SealingError`.
"""

from __future__ import annotations

import hashlib
import secrets
import struct
import time
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric import x25519
from cryptography.hazmat.primitives.hpke import AEAD, KDF, KEM, Suite

from teeshard.attest.encoding import encode, lp, u64
from teeshard.attest.errors import SealingError
from teeshard.attest.identity import NodeIdentity
from teeshard.attest.sealed_stream import ResponseReader, ResponseSealer

SEALED_PATH = "/v1/sealed"
SEALED_CONTENT_TYPE = "application/teeshard-sealed"
SUITE = Suite(KEM.X25519, KDF.HKDF_SHA256, AEAD.AES_128_GCM)
MAX_SEALED_BYTES = 64 << 20
WINDOW_S = 120  # a sealed request is accepted this long before or after its timestamp
REQUEST_ID_BYTES = 16
SECRET_BYTES = 32
IDEMPOTENCY_HEADER = "Idempotency-Key"  # of the inner request: the sealed request's digest


def _request_info(node_fingerprint: bytes) -> bytes:
    return encode(b"teeshard/sealed-request/v2\0", lp(node_fingerprint))


def _split(data: bytes, count: int) -> list[bytes]:
    """``count`` length-prefixed fields that must fill ``data`` exactly."""
    parts, offset = [], 0
    for _ in range(count):
        if offset + 4 > len(data):
            raise SealingError("sealed plaintext is truncated")
        (size,) = struct.unpack_from(">I", data, offset)
        offset += 4
        if offset + size > len(data):
            raise SealingError("sealed plaintext is truncated")
        parts.append(data[offset : offset + size])
        offset += size
    if offset != len(data):
        raise SealingError("sealed plaintext has trailing bytes")
    return parts


@dataclass(frozen=True)
class OpenedRequest:
    """A request the node has opened; seal the answer with :meth:`response_sealer`."""

    timestamp: int  # unix seconds, as the client said
    request_id: bytes
    api_key: str | None = field(repr=False)
    path: str
    body: bytes = field(repr=False)
    request_digest: bytes  # SHA-256 of the sealed request: its idempotency key
    _secret: bytes = field(repr=False)

    @property
    def idempotency_key(self) -> str:
        return self.request_digest.hex()

    def response_sealer(self) -> ResponseSealer:
        return ResponseSealer(self._secret, self.request_digest)


def open_request(identity: NodeIdentity, sealed: bytes) -> OpenedRequest:
    """Decrypt a sealed request addressed to this node; SealingError if it is not valid.

    This checks only that it opens and is well formed: the caller checks its time
    (:func:`~teeshard.attest.replay.check_time`) and replays (``ReplayCache``).
    """
    if len(sealed) > MAX_SEALED_BYTES:
        raise SealingError("sealed request is too large")
    try:
        plaintext = SUITE.decrypt(
            sealed, identity.sealing_key, info=_request_info(identity.fingerprint)
        )
    except (InvalidTag, ValueError):
        raise SealingError("sealed request does not open (tampered, or for another node)") from None
    if len(plaintext) < 8:
        raise SealingError("sealed plaintext is truncated")
    (timestamp,) = struct.unpack_from(">Q", plaintext)
    request_id, secret, key, path, body = _split(plaintext[8:], 5)
    if len(request_id) != REQUEST_ID_BYTES or len(secret) != SECRET_BYTES:
        raise SealingError("sealed request carries a malformed request id or response secret")
    try:
        path_text, key_text = path.decode(), key.decode()
    except UnicodeDecodeError:
        raise SealingError("sealed request path or API key is not UTF-8") from None
    return OpenedRequest(
        timestamp, request_id, key_text or None, path_text, body,
        hashlib.sha256(sealed).digest(), secret,
    )  # fmt: skip


def seal_request(
    node_fingerprint: bytes,
    sealing_public_key: bytes,
    path: str,
    body: bytes,
    *,
    api_key: str | None = None,
    now: float | None = None,
) -> tuple[bytes, ResponseReader]:
    """Seal ``body`` for ``path`` (and the API key) to an attested node.

    Returns the sealed bytes to POST and the reader that opens the answer. Only
    call this with a fingerprint and key taken from a *verified* bundle
    (``VerifiedNode``); :class:`~teeshard.attest.sealed_client.SealedClient` does that.
    """
    secret = secrets.token_bytes(SECRET_BYTES)
    timestamp = int(time.time() if now is None else now)
    plaintext = u64(timestamp) + b"".join(
        lp(part)
        for part in (
            secrets.token_bytes(REQUEST_ID_BYTES),
            secret,
            (api_key or "").encode(),
            path.encode(),
            body,
        )
    )
    node_key = x25519.X25519PublicKey.from_public_bytes(sealing_public_key)
    sealed = SUITE.encrypt(plaintext, node_key, info=_request_info(node_fingerprint))
    return sealed, ResponseReader(secret, hashlib.sha256(sealed).digest())
