"""Verify a node's attestation bundle: every claim in it, or a precise reason why not.

Checks, in order (each failure raises its own :class:`AttestationError` subclass):

1. freshness: the bundle answers *our* nonce, the nonce signature is younger than
   the policy's ``max_evidence_age_s``, and the certificate is within its validity;
2. the nonce signature verifies under the certificate's key;
3. the evidence: what it is (simulated, TDX or SGX) is read from the quote bytes
   and must agree with the label; simulated evidence only if the policy allows it
   (and only from a pinned key, where the policy pins keys); TDX/SGX quotes through
   dcap-qvl with collateral, then the policy (``measurements.check_report``): TCB
   status and advisories, debug mode, measurements, RTMR3 or the dstack event log;
4. the binding: report_data recomputed from the certificate's public key, the
   manifest hash and the sealing key must equal the quote's report_data;
5. the manifest hash equals the expected one (argument, else the policy's entry).

Only after all of that does :class:`VerifiedNode` exist; its
:meth:`~VerifiedNode.pinned_ssl_context` then pins exactly the attested certificate.
"""

from __future__ import annotations

import hmac
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from teeshard.attest.errors import (
    BindingError,
    CollateralError,
    FormatError,
    FreshnessError,
    ManifestMismatch,
    MeasurementError,
    QuoteError,
    SimulatedRefused,
    VerificationError,
)
from teeshard.attest.evidence import (
    INSECURE_LABEL,
    Bundle,
    Evidence,
    nonce_message,
    report_data_for,
)
from teeshard.attest.identity import (
    NodeIdentity,
    cert_fingerprint,
    load_certificate,
    pinned_client_context,
    public_key_der,
    verify_signature,
)
from teeshard.attest.manifest import ShardManifest
from teeshard.attest.providers.simulated import MAGIC as SIMULATED_MAGIC
from teeshard.attest.providers.simulated import verify_simulated_quote
from teeshard.attest.verify.dstack_eventlog import DstackInfo
from teeshard.attest.verify.measurements import check_report
from teeshard.attest.verify.policy import Policy
from teeshard.attest.verify.quote import (
    Collateral,
    CollateralSource,
    QuoteReport,
    quote_tee_type,
    verify_quote,
)

__all__ = ["CLOCK_SKEW_S", "VerifiedNode", "check_report", "evidence_kind", "verify_bundle"]

CLOCK_SKEW_S = 60


@dataclass(frozen=True)
class VerifiedNode:
    """A node whose bundle verified. ``insecure`` is True for simulated evidence."""

    provider: str
    tee_type: str
    insecure: bool
    tcb_status: str | None
    advisory_ids: tuple[str, ...]
    measurements: Mapping[str, str]
    compose_hash: bytes | None
    app_id: bytes | None
    manifest: ShardManifest
    certificate_pem: bytes
    fingerprint: bytes
    sealing_public_key: bytes
    signed_at: int
    warnings: tuple[str, ...] = field(default=())

    @property
    def manifest_hash(self) -> bytes:
        return self.manifest.combined_hash

    def pinned_ssl_context(self, client_identity: NodeIdentity | None = None) -> ssl.SSLContext:
        """Client TLS context that accepts exactly this node's attested certificate."""
        return pinned_client_context(self.certificate_pem, client_identity)

    def summary(self) -> list[str]:
        lines = [
            f"quote: {self.tee_type} (provider {self.provider}, as the node names it)",
            f"manifest: {self.manifest.model} layers {self.manifest.layers} "
            f"{self.manifest.dtype}, {len(self.manifest.tensors)} tensors, "
            f"hash {self.manifest_hash.hex()}",
            f"certificate sha256: {self.fingerprint.hex()}",
        ]
        if self.tcb_status is not None:
            advisories = ", ".join(self.advisory_ids) or "none"
            lines.append(f"tcb status: {self.tcb_status} (advisories: {advisories})")
        lines += [f"{name}: {value}" for name, value in self.measurements.items()]
        if self.compose_hash is not None:
            lines.append(f"dstack compose hash: {self.compose_hash.hex()}")
        if self.app_id is not None:
            lines.append(f"dstack app id: {self.app_id.hex()}")
        lines += [f"warning: {w}" for w in self.warnings]
        return lines


def verify_bundle(
    bundle: Bundle,
    policy: Policy,
    *,
    nonce: bytes,
    expected_manifest_hash: bytes | None = None,
    now: float | None = None,
    collateral: Collateral | CollateralSource | None = None,
    check_freshness: bool = True,
) -> VerifiedNode:
    """Verify ``bundle`` against ``policy``; raise a VerificationError subclass if anything fails.

    ``nonce`` is the one this verifier sent; ``collateral`` is needed for TDX/SGX
    quotes (a loaded collateral, a CollateralFile or a PccsCollateral).
    ``check_freshness=False`` is for offline re-checks of a stored bundle
    (``verify-receipt``): the nonce is then the bundle's own and its age is ignored.
    Blocking (collateral fetch): from async code, run it with ``asyncio.to_thread``.
    """
    now = time.time() if now is None else now
    if not hmac.compare_digest(bundle.nonce, nonce):
        raise FreshnessError("the bundle answers a different nonce (replayed evidence?)")
    cert = load_certificate(bundle.certificate_pem)
    if check_freshness:
        _check_times(bundle, cert.not_valid_before_utc.timestamp(),
                     cert.not_valid_after_utc.timestamp(), now, policy)  # fmt: skip
    manifest_hash = bundle.manifest.combined_hash
    verify_signature(
        cert, bundle.nonce_signature, nonce_message(nonce, bundle.signed_at, manifest_hash)
    )
    evidence = bundle.evidence
    warnings: list[str] = []
    report: QuoteReport | None = None
    info: DstackInfo | None = None
    measurements: dict[str, str] = {}
    kind = evidence_kind(evidence)
    if kind == "simulated" and not policy.allow_simulated:
        raise SimulatedRefused(
            "simulated evidence (no TEE) is refused; pass --allow-simulated to accept it"
        )
    if kind != evidence.tee_type:
        raise VerificationError(f"evidence is labelled {evidence.tee_type}, the quote is {kind}")
    if kind == "simulated":
        simulated = verify_simulated_quote(evidence.quote)
        if policy.simulated_keys and simulated.public_key not in policy.simulated_keys:
            raise MeasurementError(
                f"simulated key {simulated.public_key.hex()} is not listed by the policy "
                f"(simulated_keys: {len(policy.simulated_keys)} key(s) pinned)"
            )
        quoted_report_data = simulated.report_data
        measurements["simulated_key"] = simulated.public_key.hex()
        warnings.append(INSECURE_LABEL)
        if not policy.simulated_keys:
            warnings.append("simulated evidence accepted from any key (the policy pins none)")
    else:
        if collateral is None:
            raise CollateralError("a TDX/SGX quote needs collateral (--collateral or --pccs-url)")
        report = verify_quote(evidence.quote, collateral, int(now))
        info = check_report(report, evidence, policy)
        quoted_report_data = report.report_data
        measurements = report.measurements()
        if report.tee_type == "tdx" and policy.allow_any_rtmr3:
            warnings.append("RTMR3 not checked (allow_any_rtmr3): the TD's software is unverified")
    expected_rd = report_data_for(public_key_der(cert), manifest_hash, bundle.sealing_public_key)
    if not hmac.compare_digest(expected_rd, quoted_report_data):
        raise BindingError(
            "report_data in the quote does not commit to this certificate, manifest and "
            "sealing key (evidence from another node or another shard)"
        )
    _check_manifest(bundle.manifest, expected_manifest_hash, policy)
    return VerifiedNode(
        provider=evidence.provider,
        tee_type=kind,
        insecure=kind == "simulated",
        tcb_status=report.tcb_status if report else None,
        advisory_ids=report.advisory_ids if report else (),
        measurements=measurements,
        compose_hash=info.compose_hash if info else None,
        app_id=info.app_id if info else None,
        manifest=bundle.manifest,
        certificate_pem=bundle.certificate_pem,
        fingerprint=cert_fingerprint(cert),
        sealing_public_key=bundle.sealing_public_key,
        signed_at=bundle.signed_at,
        warnings=tuple(warnings),
    )


def evidence_kind(evidence: Evidence) -> str:
    """``"simulated"``, ``"tdx"`` or ``"sgx"``, read from the quote bytes, not from labels."""
    if evidence.tee_type not in ("tdx", "sgx", "simulated"):
        raise VerificationError(f"{evidence.tee_type} evidence cannot be verified by this verifier")
    if evidence.quote.startswith(SIMULATED_MAGIC):
        return "simulated"
    try:
        return quote_tee_type(evidence.quote)
    except FormatError as exc:
        raise QuoteError(f"quote rejected: {exc}") from None


def _check_times(
    bundle: Bundle, not_before: float, not_after: float, now: float, policy: Policy
) -> None:
    if not not_before - CLOCK_SKEW_S <= now <= not_after + CLOCK_SKEW_S:
        raise FreshnessError("the node's certificate is not valid at this time")
    age = now - bundle.signed_at
    if age > policy.max_evidence_age_s or age < -CLOCK_SKEW_S:
        raise FreshnessError(
            f"the nonce was signed {age:.0f} s ago; the policy allows {policy.max_evidence_age_s} s"
        )


def _check_manifest(manifest: ShardManifest, expected: bytes | None, policy: Policy) -> None:
    if expected is None:
        expected = policy.expected_manifest(manifest.model, manifest.layers)
    if expected is None:
        raise ManifestMismatch(
            f"no expected manifest hash for {manifest.model} layers {manifest.layers}: pass one "
            f"(--expect-manifest) or list it in the policy; the node's is "
            f"{manifest.weights_hash.hex()}"
        )
    # the weights part: an offloading node's statement is checked by its own policy field
    if not hmac.compare_digest(expected, manifest.weights_hash):
        raise ManifestMismatch(
            f"manifest hash {manifest.weights_hash.hex()} for {manifest.model} layers "
            f"{manifest.layers} is not the expected {expected.hex()}"
        )
