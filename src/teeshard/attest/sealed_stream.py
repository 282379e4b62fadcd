"""A sealed answer, streamed record by record, the way chunked OHTTP seals a body.

The key and nonce come from the request's response secret (only the client and
the attested node know it) and the request's digest::

    key || base nonce = HKDF-SHA256(ikm = secret, salt = request digest,
                                    info = "teeshard/sealed-response/v2\\0", 16 + 12 bytes)

Record ``i`` (from 0) is AES-128-GCM with nonce ``base nonce XOR u96(i)``::

    record    = u32(len(ciphertext)) || ciphertext           (big-endian length prefix)
    plaintext = u8(flags) || u32(len(data)) || data || zero padding to a bucket size

Record 0 is the head: ``data = u32(status) || lp(content type)``. Then data
records; the last has flag :data:`FINAL`. A reordered, replayed or altered record
fails to open (its nonce is its position); a stream that ends without a final
record, or goes on after it, is refused: truncation is detected. Plaintexts are
padded to :data:`BUCKETS`, so a record's length tells only its bucket (a long
chunk is split into records of the largest bucket).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from teeshard.attest.encoding import lp, u32
from teeshard.attest.errors import SealingError

SEALED_STREAM_TYPE = "application/teeshard-sealed-stream"
BUCKETS = (256, 1024, 4096, 16384, 65536)  # padded plaintext sizes of a record
FINAL = 0x01
_HEADER = 5  # flags + data length
_TAG = 16
_INFO = b"teeshard/sealed-response/v2\0"


def _keys(secret: bytes, request_digest: bytes) -> tuple[AESGCM, bytes]:
    material = HKDF(algorithm=hashes.SHA256(), length=28, salt=request_digest, info=_INFO).derive(
        secret
    )
    return AESGCM(material[:16]), material[16:]


def _nonce(base: bytes, index: int) -> bytes:
    return bytes(a ^ b for a, b in zip(base, index.to_bytes(12, "big"), strict=True))


def bucket_for(size: int) -> int:
    """The padded plaintext size of a record holding ``size`` data bytes."""
    for bucket in BUCKETS:
        if size + _HEADER <= bucket:
            return bucket
    raise ValueError(f"{size} bytes do not fit one record")


MAX_RECORD_DATA = BUCKETS[-1] - _HEADER
MAX_RECORD_BYTES = BUCKETS[-1] + _TAG


class ResponseSealer:
    """The node's side: seals the head, then data, then the final record, in order."""

    def __init__(self, secret: bytes, request_digest: bytes) -> None:
        self._aead, self._base = _keys(secret, request_digest)
        self._index = 0
        self._finished = False

    def _record(self, data: bytes, flags: int) -> bytes:
        if self._finished:
            raise SealingError("the sealed stream is already finished")
        padded = bytes([flags]) + u32(len(data)) + data
        padded += bytes(bucket_for(len(data)) - len(padded))
        sealed = self._aead.encrypt(_nonce(self._base, self._index), padded, None)
        self._index += 1
        self._finished = bool(flags & FINAL)
        return u32(len(sealed)) + sealed

    def head(self, status: int, content_type: str) -> bytes:
        if self._index != 0:
            raise SealingError("the head is the first record")
        return self._record(u32(status) + lp(content_type.encode()), 0)

    def data(self, data: bytes, *, final: bool = False) -> bytes:
        """``data`` as one record or more (each at most :data:`MAX_RECORD_DATA` bytes)."""
        if self._index == 0:
            raise SealingError("seal the head first")
        pieces = [data[i : i + MAX_RECORD_DATA] for i in range(0, len(data), MAX_RECORD_DATA)]
        pieces = pieces or [b""]
        last = len(pieces) - 1
        return b"".join(
            self._record(p, FINAL if final and i == last else 0) for i, p in enumerate(pieces)
        )

    def final(self, data: bytes = b"") -> bytes:
        return self.data(data, final=True)


@dataclass(frozen=True)
class SealedResponse:
    status: int
    content_type: str
    body: bytes = field(repr=False)


class ResponseReader:
    """The client's side: feed it the bytes as they arrive; it yields opened data in order."""

    def __init__(self, secret: bytes, request_digest: bytes) -> None:
        self.request_digest = request_digest
        self._aead, self._base = _keys(secret, request_digest)
        self._index = 0
        self._buffer = bytearray()
        self.status: int | None = None
        self.content_type: str | None = None
        self.finished = False

    def feed(self, chunk: bytes) -> Iterator[bytes]:
        """Open every whole record in the bytes so far; yield each data record's data."""
        self._buffer += chunk
        while len(self._buffer) >= 4:
            (size,) = struct.unpack_from(">I", self._buffer)
            if size > MAX_RECORD_BYTES or size < BUCKETS[0] + _TAG:
                raise SealingError(f"sealed record {self._index} has an impossible length {size}")
            if len(self._buffer) < 4 + size:
                return
            sealed = bytes(self._buffer[4 : 4 + size])
            del self._buffer[: 4 + size]
            data = self._open(sealed)
            if data is not None:
                yield data

    def _open(self, sealed: bytes) -> bytes | None:
        if self.finished:
            raise SealingError("a sealed record arrived after the final one")
        try:
            padded = self._aead.decrypt(_nonce(self._base, self._index), sealed, None)
        except InvalidTag:
            raise SealingError(
                f"sealed record {self._index} does not open (tampered, reordered or lost)"
            ) from None
        flags, size = padded[0], struct.unpack_from(">I", padded, 1)[0]
        if flags & ~FINAL or size > len(padded) - _HEADER or any(padded[_HEADER + size :]):
            raise SealingError(f"sealed record {self._index} is malformed")
        data = bytes(padded[_HEADER : _HEADER + size])
        index, self._index = self._index, self._index + 1
        if index == 0:
            if flags & FINAL or size < 8:
                raise SealingError("the sealed stream's head is malformed")
            self.status = struct.unpack_from(">I", data)[0]
            (length,) = struct.unpack_from(">I", data, 4)
            if 8 + length != size:
                raise SealingError("the sealed stream's head is malformed")
            self.content_type = data[8:].decode(errors="replace")
            return None
        self.finished = bool(flags & FINAL)
        return data

    def close(self) -> None:
        """The transport ended: refuse a stream cut short (no final record, or a partial one)."""
        if not self.finished or self._buffer:
            raise SealingError("the sealed stream was cut short (no final record)")

    def open_all(self, body: bytes) -> SealedResponse:
        """A whole sealed answer at once."""
        data = b"".join(self.feed(body))
        self.close()
        assert self.status is not None and self.content_type is not None
        return SealedResponse(self.status, self.content_type, data)
