"""Signed receipts: each pipeline stage attests what it received, what it sent, and its link.

A stage's receipt holds the request id, its stage index, its layer range and the
model's layer count, the number of token positions it ran through its layers in
this session (its KV cache length at close: what work credit counts), its
manifest hash, the SHA-256 of the data it received from upstream (for stage 0: the
request input) and of the data it sent downstream (for the last stage: the result
it returned), and the hash of the previous stage's receipt (32 zero bytes for
stage 0). It is signed with the stage's attested TLS key (ECDSA P-256 / SHA-256)
over::

    "teeshard/receipt/v2\\0" || lp(request_id) || u32(stage) || u32(start) || u32(end)
    || u32(model_layers) || u32(positions)
    || lp(manifest_hash) || lp(received_sha256) || lp(sent_sha256)
    || lp(previous_hash) || lp(signer certificate SHA-256)

(``model_layers`` is 0 when the signer's manifest does not state the layer count.)

``receipt_hash`` is SHA-256 of those signed bytes (not of the signature, so the
chain does not depend on ECDSA's malleable encoding). :class:`TrafficHash` gives
both ends of a hop the same digest of a sequence of frames. The entry node returns
the chain under :data:`RECEIPTS_FIELD`, and :func:`chain_digest` for the
:data:`RECEIPT_DIGEST_HEADER` header.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

from teeshard.attest.encoding import (
    check_fields,
    encode,
    from_hex,
    get_int,
    get_str,
    lp,
    u32,
    u64,
)
from teeshard.attest.errors import FormatError, ReceiptError, SignatureError
from teeshard.attest.identity import (
    NodeIdentity,
    cert_fingerprint,
    load_certificate,
    verify_signature,
)
from teeshard.attest.manifest import ShardManifest
from teeshard.model.layer_range import LayerRange

RECEIPTS_FIELD = "receipts"
RECEIPT_DIGEST_HEADER = "Teeshard-Receipt-Digest"
ZERO_HASH = bytes(32)
_DOMAIN = b"teeshard/receipt/v2\0"
_FIELDS = (
    "request_id", "stage", "layers", "model_layers", "positions", "manifest_hash", "received_sha256", "sent_sha256",
    "previous_hash", "signer", "signature",
)  # fmt: skip


@dataclass(frozen=True)
class Receipt:
    request_id: str
    stage: int
    layers: LayerRange
    model_layers: int  # layers of the whole model, from the signer's manifest (0: not stated)
    positions: int  # token positions this stage ran for the request in this session
    manifest_hash: bytes
    received_sha256: bytes
    sent_sha256: bytes
    previous_hash: bytes
    signer: bytes  # SHA-256 of the signer's certificate (DER)
    signature: bytes

    def signed_bytes(self) -> bytes:
        return encode(
            _DOMAIN,
            lp(self.request_id.encode()),
            u32(self.stage),
            u32(self.layers.start),
            u32(self.layers.end),
            u32(self.model_layers),
            u32(self.positions),
            lp(self.manifest_hash),
            lp(self.received_sha256),
            lp(self.sent_sha256),
            lp(self.previous_hash),
            lp(self.signer),
        )

    @property
    def hash(self) -> bytes:
        return receipt_hash(self)

    def to_json(self) -> dict[str, Any]:
        return {
            "request_id": self.request_id,
            "stage": self.stage,
            "layers": str(self.layers),
            "model_layers": self.model_layers,
            "positions": self.positions,
            **{name: getattr(self, name).hex() for name in _FIELDS[5:]},
        }

    @classmethod
    def from_json(cls, data: object) -> Receipt:
        what = "receipt"
        fields = check_fields(data, what, _FIELDS)
        try:
            layers = LayerRange.parse(get_str(fields, "layers", what))
        except ValueError as exc:
            raise FormatError(f"receipt.layers: {exc}") from None
        counts = {n: get_int(fields, n, what) for n in ("stage", "model_layers", "positions")}
        for name, value in counts.items():
            if not 0 <= value < 2**32:
                raise FormatError(f"receipt.{name}: must be a 32-bit unsigned integer")
        hashes = {n: from_hex(fields[n], f"receipt.{n}", 32) for n in _FIELDS[5:10]}
        return cls(
            request_id=get_str(fields, "request_id", what),
            stage=counts["stage"],
            layers=layers,
            model_layers=counts["model_layers"],
            positions=counts["positions"],
            manifest_hash=hashes["manifest_hash"],
            received_sha256=hashes["received_sha256"],
            sent_sha256=hashes["sent_sha256"],
            previous_hash=hashes["previous_hash"],
            signer=hashes["signer"],
            signature=from_hex(fields["signature"], "receipt.signature"),
        )


def receipt_hash(receipt: Receipt) -> bytes:
    return hashlib.sha256(receipt.signed_bytes()).digest()


def sign_receipt(
    identity: NodeIdentity,
    *,
    request_id: str,
    stage: int,
    layers: LayerRange,
    model_layers: int,
    positions: int,
    manifest_hash: bytes,
    received_sha256: bytes,
    sent_sha256: bytes,
    previous: Receipt | None,
) -> Receipt:
    """Sign one stage's receipt; ``previous`` is the upstream stage's (None for stage 0).

    ``positions``: the token positions this stage ran for the request (its cache
    length); ``model_layers``: the model's layer count (0 when unknown).
    """
    if (previous is None) != (stage == 0):
        raise ReceiptError("stage 0 has no previous receipt; every later stage has one")
    if previous is not None and (previous.stage != stage - 1 or previous.request_id != request_id):
        raise ReceiptError("the previous receipt is not this request's stage before this one")
    if not 0 <= positions < 2**32 or not 0 <= model_layers < 2**32:
        raise ReceiptError("positions and model_layers are 32-bit unsigned integers")
    unsigned = Receipt(
        request_id, stage, layers, model_layers, positions, manifest_hash, received_sha256,
        sent_sha256,
        previous.hash if previous else ZERO_HASH, identity.fingerprint, b"",
    )  # fmt: skip
    return replace(unsigned, signature=identity.sign(unsigned.signed_bytes()))


class TrafficHash:
    """SHA-256 over a sequence of frames, each length-prefixed, so both ends agree."""

    def __init__(self) -> None:
        self._hash = hashlib.sha256(b"teeshard/traffic/v1\0")

    def update(self, frame: bytes) -> None:
        self._hash.update(u64(len(frame)) + frame)

    def digest(self) -> bytes:
        return self._hash.copy().digest()


class SignerInfo(Protocol):
    """Anything naming an attested certificate and its manifest: a Bundle or VerifiedNode."""

    @property
    def certificate_pem(self) -> bytes: ...

    @property
    def manifest(self) -> ShardManifest: ...


@dataclass(frozen=True)
class ChainReport:
    request_id: str
    stages: int
    layers: LayerRange
    digest: bytes


def verify_chain(
    receipts: Sequence[Receipt],
    signers: Iterable[SignerInfo],
    *,
    request_id: str | None = None,
    num_layers: int | None = None,
    check_data_links: bool = True,
    complete: bool = True,
) -> ChainReport:
    """Check a whole chain; any altered field, reordering, gap or foreign key fails.

    ``signers`` are the stages' bundles (or verified nodes): each receipt must be
    signed by one of their certificates and carry that node's manifest hash and
    layer range. The layers must run contiguously from 0 to ``num_layers`` (default:
    the model's layer count from the last signer's manifest), so a dropped stage at
    either end is caught too. ``check_data_links`` requires each stage to have
    received exactly what the stage before it sent. ``complete=False`` accepts a
    chain that stops early (a route segment that lost a node: the stages after it
    could not sign); it must still start at layer 0, link and verify throughout.
    """
    if not receipts:
        raise ReceiptError("the receipt chain is empty")
    by_fingerprint = {}
    for signer in signers:
        cert = load_certificate(signer.certificate_pem)
        by_fingerprint[cert_fingerprint(cert)] = (cert, signer.manifest)
    expected_id = receipts[0].request_id if request_id is None else request_id
    previous: Receipt | None = None
    for index, receipt in enumerate(receipts):
        where = f"receipt {index}"
        if receipt.request_id != expected_id:
            raise ReceiptError(
                f"{where} is for request {receipt.request_id!r}, not {expected_id!r}"
            )
        if receipt.stage != index:
            raise ReceiptError(f"{where} says stage {receipt.stage}: reordered or missing stage")
        link = previous.hash if previous is not None else ZERO_HASH
        if not hmac.compare_digest(receipt.previous_hash, link):
            raise ReceiptError(f"{where} does not link to the receipt before it")
        known = by_fingerprint.get(receipt.signer)
        if known is None:
            raise ReceiptError(f"{where} is signed by an unknown certificate")
        cert, manifest = known
        try:
            verify_signature(cert, receipt.signature, receipt.signed_bytes())
        except SignatureError:
            raise ReceiptError(f"{where}: signature does not verify (altered receipt)") from None
        if (
            receipt.manifest_hash != manifest.combined_hash
            or receipt.layers != manifest.layers
            or receipt.model_layers != (manifest.num_layers or 0)
        ):
            raise ReceiptError(f"{where}: manifest or layers differ from the signer's attestation")
        start = previous.layers.end if previous is not None else 0
        if receipt.layers.start != start:
            raise ReceiptError(f"{where}: layers {receipt.layers} do not start at {start}")
        if (
            check_data_links
            and previous is not None
            and not hmac.compare_digest(receipt.received_sha256, previous.sent_sha256)
        ):
            raise ReceiptError(f"{where}: received data differs from what stage {index - 1} sent")
        if previous is not None and receipt.positions > previous.positions:
            raise ReceiptError(
                f"{where} ran {receipt.positions} token positions; stage {index - 1} sent it "
                f"only {previous.positions}"
            )
        previous = receipt
    assert previous is not None
    total = num_layers if num_layers is not None else by_fingerprint[previous.signer][1].num_layers
    if complete and (total is None or previous.layers.end != total):
        raise ReceiptError(
            f"the chain ends at layer {previous.layers.end} of {total}: stage missing"
        )
    return ChainReport(expected_id, len(receipts), LayerRange(0, previous.layers.end),
                       chain_digest(receipts))  # fmt: skip


def chain_digest(receipts: Sequence[Receipt]) -> bytes:
    """SHA-256 over the receipt hashes in order: the value of the digest header."""
    digest = hashlib.sha256(b"teeshard/receipt-chain/v1\0")
    for receipt in receipts:
        digest.update(receipt.hash)
    return digest.digest()


def receipts_to_json(receipts: Sequence[Receipt]) -> list[dict[str, Any]]:
    return [r.to_json() for r in receipts]


def receipts_from_json(data: object) -> list[Receipt]:
    """A list of receipts, or any JSON object holding one under ``"receipts"``."""
    if isinstance(data, dict):
        if RECEIPTS_FIELD not in data:
            raise FormatError(f"no {RECEIPTS_FIELD!r} field in the JSON object")
        data = data[RECEIPTS_FIELD]
    if not isinstance(data, list):
        raise FormatError("expected a list of receipts")
    return [Receipt.from_json(item) for item in data]


def load_receipts(text: str | bytes) -> list[Receipt]:
    try:
        return receipts_from_json(json.loads(text))
    except ValueError as exc:
        if isinstance(exc, FormatError):
            raise
        raise FormatError(f"receipts are not JSON: {exc}") from None
