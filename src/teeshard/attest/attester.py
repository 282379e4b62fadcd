"""The node side: one identity, one quote at start, a fresh nonce signature per request.

At start a node creates its :class:`NodeIdentity`, computes its shard manifest,
and asks its provider for evidence over
``report_data_for(TLS public key, manifest hash, sealing key)``. The quote does not
change while the process lives; freshness comes from signing each verifier's nonce
with the attested TLS key (:meth:`NodeAttestation.bundle`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from teeshard.attest.encoding import from_hex
from teeshard.attest.evidence import (
    Bundle,
    Evidence,
    check_nonce,
    nonce_message,
    report_data_for,
)
from teeshard.attest.identity import NodeIdentity
from teeshard.attest.manifest import ShardManifest
from teeshard.attest.providers.base import Provider
from teeshard.attest.receipts import Receipt, sign_receipt
from teeshard.model.layer_range import LayerRange

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NodeAttestation:
    identity: NodeIdentity
    manifest: ShardManifest
    evidence: Evidence = field(repr=False)

    @classmethod
    def create(
        cls, provider: Provider, manifest: ShardManifest, identity: NodeIdentity | None = None
    ) -> NodeAttestation:
        """Generate (or take) the identity and quote it together with ``manifest``."""
        identity = identity or NodeIdentity.generate()
        report_data = report_data_for(
            identity.public_key_der, manifest.combined_hash, identity.sealing_public_key
        )
        evidence = provider.quote(report_data)
        log.info(
            "attested: provider %s%s, manifest %s, certificate %s",
            evidence.provider, " (INSECURE)" if evidence.insecure else "",
            manifest.combined_hash.hex()[:16], identity.fingerprint.hex()[:16],
        )  # fmt: skip
        return cls(identity, manifest, evidence)

    def bundle(self, nonce: bytes, now: float | None = None) -> Bundle:
        """The bundle answering ``nonce`` (16 to 64 bytes)."""
        check_nonce(nonce)
        signed_at = int(time.time() if now is None else now)
        message = nonce_message(nonce, signed_at, self.manifest.combined_hash)
        return Bundle(
            evidence=self.evidence,
            manifest=self.manifest,
            certificate_pem=self.identity.certificate_pem,
            sealing_public_key=self.identity.sealing_public_key,
            nonce=nonce,
            signed_at=signed_at,
            nonce_signature=self.identity.sign(message),
        )

    def bundle_json(self, nonce_hex: str) -> dict[str, object]:
        """For ``GET /v1/attestation?nonce=HEX``: raises FormatError (HTTP 400) on a bad nonce."""
        return self.bundle(from_hex(nonce_hex, "nonce")).to_json()

    def sign_receipt(
        self,
        *,
        request_id: str,
        stage: int,
        received_sha256: bytes,
        sent_sha256: bytes,
        previous: Receipt | None,
        layers: LayerRange | None = None,
    ) -> Receipt:
        """This node's receipt for one request (see :func:`receipts.sign_receipt`)."""
        return sign_receipt(
            self.identity,
            request_id=request_id,
            stage=stage,
            layers=layers or self.manifest.layers,
            manifest_hash=self.manifest.combined_hash,
            received_sha256=received_sha256,
            sent_sha256=sent_sha256,
            previous=previous,
        )
