"""Operator claims: a node's attested key names the account that operates it.

A node is started with its operator's account (``teeshard node --operator
ACCOUNT``). On request it signs, with the TLS key its quote binds (the key of
``teeshard.attest.identity.NodeIdentity``)::

    "teeshard/operator-claim/v1\\0" || lp(operator) || lp(node_id) || lp(ledger_id)
    || lp(nonce) || lp(SHA-256 of the signer's certificate, DER)

``ledger_id`` names one ledger (the SQL ledger's id, or the contract address), so a
claim made for one ledger is worthless on another; ``nonce`` is the registrar's
fresh nonce (the same one its attestation request used), so a claim cannot be
replayed. Registration needs a claim naming the registering account; admission
needs a claim made by the certificate the admitting entry node has just verified,
naming the registered operator and node, for the URL that was verified. A relay
passing someone else's bundle along cannot make a claim for itself: it has not the
key.

The node serves claims at ``GET /v1/operator-claim?nonce=HEX&ledger=ID``: mount
:func:`claim_response` there (the node assembly does; it is a pure function of the
node's identity, its operator and node id, and the query).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from teeshard.attest.encoding import encode, lp
from teeshard.attest.errors import AttestationError
from teeshard.attest.identity import (
    NodeIdentity,
    cert_fingerprint,
    load_certificate,
    verify_signature,
)
from teeshard.ledger.interface import ClaimRefused

CLAIM_PATH = "/v1/operator-claim"
_DOMAIN = b"teeshard/operator-claim/v1\0"
MAX_NONCE_BYTES = 64


@dataclass(frozen=True)
class OperatorClaim:
    operator: str
    node_id: str
    ledger_id: str
    nonce: bytes
    certificate_pem: bytes  # the signer's certificate (the bundle attests it)
    signature: bytes

    def signed_bytes(self) -> bytes:
        return claim_message(
            self.operator, self.node_id, self.ledger_id, self.nonce, self.certificate_pem
        )

    @property
    def fingerprint(self) -> str:
        return cert_fingerprint(load_certificate(self.certificate_pem)).hex()

    def to_json(self) -> dict[str, str]:
        return {
            "operator": self.operator,
            "node_id": self.node_id,
            "ledger": self.ledger_id,
            "nonce": self.nonce.hex(),
            "certificate": self.certificate_pem.decode(),
            "signature": self.signature.hex(),
        }

    @classmethod
    def from_json(cls, data: object) -> OperatorClaim:
        if not isinstance(data, Mapping):
            raise ClaimRefused("the operator claim is not a JSON object")
        try:
            return cls(
                _text(data, "operator"),
                _text(data, "node_id"),
                _text(data, "ledger"),
                bytes.fromhex(_text(data, "nonce")),
                _text(data, "certificate").encode(),
                bytes.fromhex(_text(data, "signature")),
            )
        except ValueError:
            raise ClaimRefused("the operator claim has a field that is not hex") from None


@dataclass(frozen=True)
class AttestedNode:
    """What an admitting entry node verified: the URL it fetched and the node's fresh claim."""

    url: str
    claim: OperatorClaim


def _text(data: Mapping[str, Any], key: str) -> str:
    value = data.get(key)
    if not isinstance(value, str) or not value:
        raise ClaimRefused(f"the operator claim lacks {key!r}")
    return value


def claim_message(
    operator: str, node_id: str, ledger_id: str, nonce: bytes, certificate_pem: bytes
) -> bytes:
    fingerprint = cert_fingerprint(load_certificate(certificate_pem))
    return encode(
        _DOMAIN,
        lp(operator.encode()),
        lp(node_id.encode()),
        lp(ledger_id.encode()),
        lp(nonce),
        lp(fingerprint),
    )


def sign_claim(
    identity: NodeIdentity, operator: str, node_id: str, ledger_id: str, nonce: bytes
) -> OperatorClaim:
    """The claim a node makes with its attested key (runs inside the node)."""
    if not operator:
        raise ClaimRefused("this node was started without an operator (--operator ACCOUNT)")
    if not 16 <= len(nonce) <= MAX_NONCE_BYTES:
        raise ClaimRefused(f"the nonce must be 16-{MAX_NONCE_BYTES} bytes, got {len(nonce)}")
    if not ledger_id or len(ledger_id) > 128:
        raise ClaimRefused("name the ledger (1-128 characters): its id or contract address")
    pem = identity.certificate_pem
    message = claim_message(operator, node_id, ledger_id, nonce, pem)
    return OperatorClaim(operator, node_id, ledger_id, nonce, pem, identity.sign(message))


def claim_response(
    identity: NodeIdentity, operator: str | None, node_id: str, nonce_hex: str, ledger_id: str
) -> dict[str, str]:
    """The body of ``GET /v1/operator-claim?nonce=&ledger=``; ``ClaimRefused`` is a 400."""
    try:
        nonce = bytes.fromhex(nonce_hex)
    except ValueError:
        raise ClaimRefused("nonce must be hex") from None
    return sign_claim(identity, operator or "", node_id, ledger_id, nonce).to_json()


def verify_claim(
    claim: OperatorClaim,
    *,
    operator: str,
    node_id: str,
    ledger_id: str,
    nonce: bytes | None = None,
    certificate_pem: bytes | None = None,
) -> None:
    """Raise ``ClaimRefused`` unless ``claim`` is signed and names exactly these values.

    ``certificate_pem``: the attested certificate the claim must be made by (the
    admitting entry's verified bundle); ``nonce``: the registrar's nonce, when known.
    """
    try:
        cert = load_certificate(claim.certificate_pem)
        verify_signature(cert, claim.signature, claim.signed_bytes())
    except AttestationError as exc:
        raise ClaimRefused(f"the operator claim does not verify: {exc}") from None
    if certificate_pem is not None and cert_fingerprint(cert) != cert_fingerprint(
        load_certificate(certificate_pem)
    ):
        raise ClaimRefused("the operator claim is not signed by the attested certificate")
    for what, got, want in (
        ("operator", claim.operator, operator),
        ("node id", claim.node_id, node_id),
        ("ledger", claim.ledger_id, ledger_id),
    ):
        if got != want:
            raise ClaimRefused(f"the node's claim names {what} {got!r}, not {want!r}")
    if nonce is not None and claim.nonce != nonce:
        raise ClaimRefused("the operator claim answers another nonce (replayed?)")
