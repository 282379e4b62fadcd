"""The node side: an identity and its quote, a fresh nonce signature per request, renewal.

At start a node creates its :class:`NodeIdentity`, computes its shard manifest,
and asks its provider for evidence over
``report_data_for(TLS public key, manifest hash, sealing key)``. Freshness comes
from signing each verifier's nonce with the attested TLS key
(:meth:`NodeAttestation.bundle`).

Certificates live 7 days; the quote binds the key, so renewing one means renewing
both: :meth:`NodeAttestation.refresh` makes new keys and a new certificate for the
same hosts, quotes them, and swaps identity and evidence together (one reference,
so a bundle never mixes the old key with the new quote). Server TLS contexts made
by :meth:`NodeAttestation.server_ssl_context` present the new certificate from the
next handshake on; open connections keep theirs, and peers pin the new one when
they next connect and re-attest. An async runtime runs
:meth:`NodeAttestation.keep_fresh` as a task (its timer: quote in a worker thread,
install on the event loop); blocking code calls :meth:`NodeAttestation.refresh_if_due`.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import threading
import time
import weakref
from dataclasses import dataclass, field

from teeshard.attest.encoding import from_hex
from teeshard.attest.errors import AttestationError, ProviderError
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

RENEW_AT = 0.8  # renew once this fraction of the certificate's lifetime has passed
RENEW_CHECK_S = 3600.0


@dataclass(frozen=True)
class Attested:
    """One identity and the evidence that binds it: always replaced together."""

    identity: NodeIdentity
    evidence: Evidence = field(repr=False)


def quote_identity(provider: Provider, identity: NodeIdentity, manifest: ShardManifest) -> Evidence:
    report_data = report_data_for(
        identity.public_key_der, manifest.combined_hash, identity.sealing_public_key
    )
    return provider.quote(report_data)


class NodeAttestation:
    """A node's current attested identity; ``provider`` makes renewal possible."""

    def __init__(
        self,
        identity: NodeIdentity,
        manifest: ShardManifest,
        evidence: Evidence,
        provider: Provider | None = None,
    ) -> None:
        self.manifest = manifest
        self.provider = provider
        self._current = Attested(identity, evidence)
        self._previous: Attested | None = None
        self._lock = threading.Lock()  # one install at a time
        self._contexts: weakref.WeakSet[ssl.SSLContext] = weakref.WeakSet()

    def __repr__(self) -> str:
        return (
            f"NodeAttestation(manifest={self.manifest.combined_hash.hex()[:16]}, "
            f"certificate={self.identity.fingerprint.hex()[:16]})"
        )

    @classmethod
    def create(
        cls, provider: Provider, manifest: ShardManifest, identity: NodeIdentity | None = None
    ) -> NodeAttestation:
        """Generate (or take) the identity and quote it together with ``manifest``."""
        identity = identity or NodeIdentity.generate()
        evidence = quote_identity(provider, identity, manifest)
        log.info(
            "attested: provider %s%s, manifest %s, certificate %s",
            evidence.provider, " (INSECURE)" if evidence.insecure else "",
            manifest.combined_hash.hex()[:16], identity.fingerprint.hex()[:16],
        )  # fmt: skip
        return cls(identity, manifest, evidence, provider)

    @property
    def identity(self) -> NodeIdentity:
        return self._current.identity

    @property
    def evidence(self) -> Evidence:
        return self._current.evidence

    def identities(self) -> tuple[NodeIdentity, ...]:
        """The current identity, then the one it replaced (for requests sealed just before)."""
        previous = self._previous
        return (self.identity,) if previous is None else (self.identity, previous.identity)

    # -- renewal -----------------------------------------------------------------------

    def server_ssl_context(self) -> ssl.SSLContext:
        """A TLS server context presenting the current identity, and each renewed one."""
        context = self.identity.server_ssl_context()
        self._contexts.add(context)
        return context

    def refresh(self) -> None:
        """Re-key and re-quote: new TLS and sealing keys, certificate for the same hosts.

        Raises ProviderError if this attestation has no provider or the quote fails;
        the current identity then stays in place.
        """
        self._install(self._renewed())

    def refresh_if_due(self, at: float = RENEW_AT) -> bool:
        """Refresh when the fraction ``at`` of the certificate's life has passed; True if so.

        Blocking (the provider's quote): from async code, use :meth:`keep_fresh`.
        """
        if not self.identity.renewal_due(at=at):
            return False
        self.refresh()
        return True

    async def keep_fresh(self, check_every_s: float = RENEW_CHECK_S, at: float = RENEW_AT) -> None:
        """Check every ``check_every_s`` seconds, renew when due; runs until cancelled.

        The quote is made in a worker thread; the new identity is installed on the
        event loop's thread, the one that makes TLS connections from the contexts.
        A failed quote is logged and retried at the next check; the old identity
        serves until then (a verifier refuses it once its certificate expires).
        """
        while True:
            await asyncio.sleep(check_every_s)
            if not self.identity.renewal_due(at=at):
                continue
            try:
                self._install(await asyncio.to_thread(self._renewed))
            except AttestationError as exc:
                log.error("re-attestation failed, retrying in %.0f s: %s", check_every_s, exc)

    def _renewed(self) -> Attested:
        if self.provider is None:
            raise ProviderError("this attestation was made without a provider: cannot re-quote")
        old = self.identity
        identity = NodeIdentity.generate(old.hosts, old.validity)
        return Attested(identity, quote_identity(self.provider, identity, self.manifest))

    def _install(self, new: Attested) -> None:
        with self._lock:
            old = self._current
            self._previous, self._current = old, new
            for context in list(self._contexts):
                new.identity.load_into(context)
        log.info(
            "re-attested: certificate %s replaces %s (valid until %s)",
            new.identity.fingerprint.hex()[:16], old.identity.fingerprint.hex()[:16],
            new.identity.certificate.not_valid_after_utc.isoformat(),
        )  # fmt: skip

    # -- serving -------------------------------------------------------------------------

    def bundle(self, nonce: bytes, now: float | None = None) -> Bundle:
        """The bundle answering ``nonce`` (16 to 64 bytes)."""
        check_nonce(nonce)
        current = self._current  # one snapshot: key, certificate and quote belong together
        signed_at = int(time.time() if now is None else now)
        message = nonce_message(nonce, signed_at, self.manifest.combined_hash)
        return Bundle(
            evidence=current.evidence,
            manifest=self.manifest,
            certificate_pem=current.identity.certificate_pem,
            sealing_public_key=current.identity.sealing_public_key,
            nonce=nonce,
            signed_at=signed_at,
            nonce_signature=current.identity.sign(message),
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
        positions: int,
        layers: LayerRange | None = None,
    ) -> Receipt:
        """This node's receipt for one request (see :func:`receipts.sign_receipt`)."""
        return sign_receipt(
            self.identity,
            request_id=request_id,
            stage=stage,
            layers=layers or self.manifest.layers,
            model_layers=self.manifest.num_layers or 0,
            positions=positions,
            manifest_hash=self.manifest.combined_hash,
            received_sha256=received_sha256,
            sent_sha256=sent_sha256,
            previous=previous,
        )
