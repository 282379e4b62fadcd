"""Evidence from a TEE, the attestation bundle a node serves, and the report_data binding.

``report_data`` (the 64 bytes a quote carries for the attested software) is::

    SHA-512( "teeshard/report-data/v1\\0"
             || lp(DER SubjectPublicKeyInfo of the node's TLS key)
             || lp(shard manifest combined hash)
             || lp(raw X25519 sealing public key) )

where ``lp(x) = u32_be(len(x)) || x``. A verifier recomputes it from the certificate,
manifest and sealing key in the bundle; a match proves those three came from inside
the TEE that produced the quote.

A :class:`Bundle` is what ``GET /v1/attestation?nonce=HEX`` returns. It holds no
prompt, output or request data of any kind.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from teeshard.attest.encoding import (
    check_fields,
    encode,
    from_hex,
    get_bool,
    get_int,
    get_str,
    lp,
    u64,
)
from teeshard.attest.errors import FormatError
from teeshard.attest.manifest import ShardManifest

REPORT_DATA_SIZE = 64
BUNDLE_VERSION = 1
MIN_NONCE_BYTES = 16
MAX_NONCE_BYTES = 64
TEE_TYPES = ("tdx", "sgx", "sev-snp", "simulated")
INSECURE_LABEL = "INSECURE (simulated TEE: proves nothing about the hardware)"

_REPORT_DATA_DOMAIN = b"teeshard/report-data/v1\0"
_NONCE_DOMAIN = b"teeshard/nonce-signature/v1\0"


def report_data_for(
    public_key_der: bytes, manifest_hash: bytes, sealing_public_key: bytes
) -> bytes:
    """The 64 bytes of report_data that bind a node's keys to its shard manifest."""
    body = encode(
        _REPORT_DATA_DOMAIN, lp(public_key_der), lp(manifest_hash), lp(sealing_public_key)
    )
    return hashlib.sha512(body).digest()


def nonce_message(nonce: bytes, signed_at: int, manifest_hash: bytes) -> bytes:
    """What the node signs with its attested TLS key to answer a verifier's nonce."""
    return encode(_NONCE_DOMAIN, lp(nonce), u64(signed_at), lp(manifest_hash))


def check_nonce(nonce: bytes) -> bytes:
    if not MIN_NONCE_BYTES <= len(nonce) <= MAX_NONCE_BYTES:
        raise FormatError(
            f"nonce must be {MIN_NONCE_BYTES} to {MAX_NONCE_BYTES} bytes, got {len(nonce)}"
        )
    return nonce


@dataclass(frozen=True)
class Evidence:
    """A quote (or simulated equivalent) over 64 bytes of report_data.

    ``event_log`` is the provider's event log as it gave it (dstack: a JSON list),
    or None. ``insecure`` is True exactly for simulated evidence.
    """

    provider: str  # "dstack", "dstack-tappd", "gramine", "tsm", "simulated"
    tee_type: str  # one of TEE_TYPES
    quote: bytes
    report_data: bytes
    event_log: str | None = None
    insecure: bool = False

    def __post_init__(self) -> None:
        if self.tee_type not in TEE_TYPES:
            raise FormatError(f"unknown tee type {self.tee_type!r}")
        if len(self.report_data) != REPORT_DATA_SIZE:
            raise FormatError(f"report_data must be {REPORT_DATA_SIZE} bytes")
        if (self.tee_type == "simulated") != self.insecure:
            raise FormatError("simulated evidence, and only it, is marked insecure")

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "provider": self.provider,
            "tee_type": self.tee_type,
            "quote": self.quote.hex(),
            "report_data": self.report_data.hex(),
            "event_log": self.event_log,
            "insecure": self.insecure,
        }
        if self.insecure:
            data["warning"] = INSECURE_LABEL
        return data

    @classmethod
    def from_json(cls, data: object) -> Evidence:
        what = "evidence"
        fields = check_fields(
            data,
            what,
            ("provider", "tee_type", "quote", "report_data", "event_log", "insecure"),
            ("warning",),
        )
        event_log = fields["event_log"]
        if event_log is not None and not isinstance(event_log, str):
            raise FormatError("evidence.event_log: expected a string or null")
        return cls(
            provider=get_str(fields, "provider", what),
            tee_type=get_str(fields, "tee_type", what),
            quote=from_hex(fields["quote"], "evidence.quote"),
            report_data=from_hex(fields["report_data"], "evidence.report_data", REPORT_DATA_SIZE),
            event_log=event_log,
            insecure=get_bool(fields, "insecure", what),
        )


@dataclass(frozen=True)
class Bundle:
    """Everything a verifier needs to trust one node, answering one nonce."""

    evidence: Evidence
    manifest: ShardManifest
    certificate_pem: bytes
    sealing_public_key: bytes  # raw X25519, 32 bytes
    nonce: bytes
    signed_at: int  # unix seconds when the nonce was signed
    nonce_signature: bytes  # ECDSA P-256 / SHA-256 over nonce_message(), DER

    def to_json(self) -> dict[str, Any]:
        return {
            "version": BUNDLE_VERSION,
            "evidence": self.evidence.to_json(),
            "manifest": self.manifest.to_json(),
            "certificate": self.certificate_pem.decode(),
            "sealing_public_key": self.sealing_public_key.hex(),
            "nonce": self.nonce.hex(),
            "signed_at": self.signed_at,
            "nonce_signature": self.nonce_signature.hex(),
        }

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=2)

    @classmethod
    def from_json(cls, data: object) -> Bundle:
        """Strict parse: unknown or missing fields, bad hex and bad lengths are refused."""
        what = "bundle"
        fields = check_fields(
            data,
            what,
            (
                "version",
                "evidence",
                "manifest",
                "certificate",
                "sealing_public_key",
                "nonce",
                "signed_at",
                "nonce_signature",
            ),
        )
        if get_int(fields, "version", what) != BUNDLE_VERSION:
            raise FormatError(f"bundle.version: only version {BUNDLE_VERSION} is understood")
        certificate = get_str(fields, "certificate", what)
        if "-----BEGIN CERTIFICATE-----" not in certificate:
            raise FormatError("bundle.certificate: expected a PEM certificate")
        return cls(
            evidence=Evidence.from_json(fields["evidence"]),
            manifest=ShardManifest.from_json(fields["manifest"]),
            certificate_pem=certificate.encode(),
            sealing_public_key=from_hex(fields["sealing_public_key"], "sealing_public_key", 32),
            nonce=check_nonce(from_hex(fields["nonce"], "bundle.nonce")),
            signed_at=get_int(fields, "signed_at", what),
            nonce_signature=from_hex(fields["nonce_signature"], "bundle.nonce_signature"),
        )

    @classmethod
    def loads(cls, text: str | bytes) -> Bundle:
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise FormatError(f"bundle is not JSON: {exc}") from None
        return cls.from_json(data)
