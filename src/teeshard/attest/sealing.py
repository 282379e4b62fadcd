"""End-to-end sealed requests: HPKE to the entry node's attested X25519 key.

An HTTP ingress outside the TEE (a load balancer, Phala's gateway) then sees only
ciphertext. HPKE is RFC 9180 base mode, DHKEM(X25519, HKDF-SHA256), HKDF-SHA256,
AES-128-GCM, single-shot, from ``cryptography.hazmat.primitives.hpke``.

Request (client → node, POST :data:`SEALED_PATH`, content type
:data:`SEALED_CONTENT_TYPE`)::

    HPKE-seal(node sealing key,
              info = "teeshard/sealed-request/v1\\0" || lp(node cert SHA-256),
              plaintext = lp(reply public key) || lp(path) || lp(body))

The client makes a fresh X25519 *reply key* per request and puts its public half
inside the ciphertext, so only the attested node learns it. The node seals the
response to it, bound to this exact request::

    HPKE-seal(reply key, info = "teeshard/sealed-response/v1\\0" || lp(SHA-256(request)),
              plaintext = u32(status) || lp(body))

For streaming, each chunk is sealed separately with its index and a final flag in
``info``, so chunks cannot be reordered, dropped or cut short unnoticed. Any
tampering makes opening fail with :class:`SealingError`.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import x25519
from cryptography.hazmat.primitives.hpke import AEAD, KDF, KEM, Suite

from teeshard.attest.encoding import encode, lp, u32, u64
from teeshard.attest.errors import SealingError
from teeshard.attest.identity import NodeIdentity

SEALED_PATH = "/v1/sealed"
SEALED_CONTENT_TYPE = "application/teeshard-sealed"
SUITE = Suite(KEM.X25519, KDF.HKDF_SHA256, AEAD.AES_128_GCM)
MAX_SEALED_BYTES = 64 << 20


def _request_info(node_fingerprint: bytes) -> bytes:
    return encode(b"teeshard/sealed-request/v1\0", lp(node_fingerprint))


def _response_info(request_digest: bytes) -> bytes:
    return encode(b"teeshard/sealed-response/v1\0", lp(request_digest))


def _chunk_info(request_digest: bytes, index: int, final: bool) -> bytes:
    return encode(b"teeshard/sealed-chunk/v1\0", lp(request_digest), u64(index), bytes([final]))


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


def _raw(public_key: x25519.X25519PublicKey) -> bytes:
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


# -- node side ---------------------------------------------------------------------------


@dataclass(frozen=True)
class OpenedRequest:
    """A request the node has opened; seal the answer with its methods."""

    path: str
    body: bytes = field(repr=False)
    request_digest: bytes
    _reply_key: x25519.X25519PublicKey = field(repr=False)

    def seal_response(self, status: int, body: bytes) -> bytes:
        plaintext = u32(status) + lp(body)
        return SUITE.encrypt(plaintext, self._reply_key, info=_response_info(self.request_digest))

    def seal_chunk(self, index: int, data: bytes, final: bool) -> bytes:
        info = _chunk_info(self.request_digest, index, final)
        return SUITE.encrypt(data, self._reply_key, info=info)


def open_request(identity: NodeIdentity, sealed: bytes) -> OpenedRequest:
    """Decrypt a sealed request addressed to this node; SealingError if it is not valid."""
    if len(sealed) > MAX_SEALED_BYTES:
        raise SealingError("sealed request is too large")
    try:
        plaintext = SUITE.decrypt(
            sealed, identity.sealing_key, info=_request_info(identity.fingerprint)
        )
    except (InvalidTag, ValueError):
        raise SealingError("sealed request does not open (tampered, or for another node)") from None
    reply, path, body = _split(plaintext, 3)
    if len(reply) != 32:
        raise SealingError("sealed request carries a malformed reply key")
    try:
        path_text = path.decode()
    except UnicodeDecodeError:
        raise SealingError("sealed request path is not UTF-8") from None
    return OpenedRequest(
        path_text,
        body,
        hashlib.sha256(sealed).digest(),
        x25519.X25519PublicKey.from_public_bytes(reply),
    )


# -- client side -------------------------------------------------------------------------


@dataclass(frozen=True)
class SealedResponse:
    status: int
    body: bytes = field(repr=False)


class ResponseOpener:
    """Holds one request's reply key; opens that request's response or chunks, in order."""

    def __init__(self, reply_key: x25519.X25519PrivateKey, request_digest: bytes) -> None:
        self._reply_key = reply_key
        self.request_digest = request_digest
        self._next_chunk = 0
        self._finished = False

    def open_response(self, sealed: bytes) -> SealedResponse:
        try:
            plaintext = SUITE.decrypt(
                sealed, self._reply_key, info=_response_info(self.request_digest)
            )
        except (InvalidTag, ValueError):
            raise SealingError("sealed response does not open (tampered or not ours)") from None
        if len(plaintext) < 4:
            raise SealingError("sealed response is truncated")
        (status,) = struct.unpack_from(">I", plaintext)
        (body,) = _split(plaintext[4:], 1)
        return SealedResponse(status, body)

    def open_chunk(self, sealed: bytes) -> tuple[bytes, bool]:
        """The next chunk's data and whether it is the last; order is enforced."""
        if self._finished:
            raise SealingError("a chunk arrived after the final one")
        for final in (False, True):
            info = _chunk_info(self.request_digest, self._next_chunk, final)
            try:
                data = SUITE.decrypt(sealed, self._reply_key, info=info)
            except (InvalidTag, ValueError):
                continue
            self._next_chunk += 1
            self._finished = final
            return data, final
        raise SealingError(f"chunk {self._next_chunk} does not open (tampered, reordered, lost)")


def seal_request(
    node_fingerprint: bytes, sealing_public_key: bytes, path: str, body: bytes
) -> tuple[bytes, ResponseOpener]:
    """Seal ``body`` for ``path`` to an attested node; keep the opener for its answer.

    Only call this with a fingerprint and key taken from a *verified* bundle
    (``VerifiedNode``); :class:`~teeshard.attest.client.SealedClient` does that.
    """
    reply_key = x25519.X25519PrivateKey.generate()
    plaintext = lp(_raw(reply_key.public_key())) + lp(path.encode()) + lp(body)
    node_key = x25519.X25519PublicKey.from_public_bytes(sealing_public_key)
    sealed = SUITE.encrypt(plaintext, node_key, info=_request_info(node_fingerprint))
    return sealed, ResponseOpener(reply_key, hashlib.sha256(sealed).digest())
