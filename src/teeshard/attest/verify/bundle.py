"""Verify a node's attestation bundle: every claim in it, or a precise reason why not.

Checks, in order (each failure raises its own :class:`AttestationError` subclass):

1. freshness: the bundle answers *our* nonce, the nonce signature is younger than
   the policy's ``max_evidence_age_s``, and the certificate is within its validity;
2. the nonce signature verifies under the certificate's key;
3. the evidence: simulated evidence only if the policy allows it; TDX/SGX quotes
   through dcap-qvl with collateral, then TCB status, debug mode and measurements
   against the policy, and for dstack the RTMR3 event log replay and compose hash;
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
    EventLogError,
    FreshnessError,
    ManifestMismatch,
    MeasurementError,
    SimulatedRefused,
    TcbStatusError,
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
from teeshard.attest.providers.simulated import verify_simulated_quote
from teeshard.attest.verify.dstack_eventlog import DstackInfo, verify_event_log
from teeshard.attest.verify.policy import Policy
from teeshard.attest.verify.quote import Collateral, CollateralSource, QuoteReport, verify_quote

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
            f"provider: {self.provider} ({self.tee_type})",
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


def check_report(report: QuoteReport, evidence: Evidence, policy: Policy) -> DstackInfo | None:
    """Apply the policy to a verified quote's claims (pure; no I/O)."""
    if report.tcb_status not in policy.allowed_tcb_statuses:
        advisories = ", ".join(report.advisory_ids) or "none"
        raise TcbStatusError(
            f"TCB status {report.tcb_status} is not allowed (allowed: "
            f"{', '.join(sorted(policy.allowed_tcb_statuses))}; advisories: {advisories})"
        )
    if report.debug and not policy.allow_debug:
        raise MeasurementError(f"the {report.tee_type.upper()} runs in debug mode")
    if report.tee_type == "sgx":
        _check_sgx(report, policy)
        return None
    for name in ("mrtd", "rtmr0", "rtmr1", "rtmr2"):
        _check_listed(name.upper(), getattr(report, name), getattr(policy, name))
    is_dstack = evidence.provider.startswith("dstack")
    if not policy.compose_hashes and not is_dstack:
        return None
    # Why policy-driven: the provider label is self-reported, so a dstack quote
    # relabelled "tsm" must not skip the compose-hash check the policy asks for.
    if not policy.compose_hashes:
        raise MeasurementError("dstack evidence, but the policy lists no dstack compose hash")
    if evidence.event_log is None or report.rtmr3 is None:
        raise EventLogError("the policy requires a dstack compose hash; no event log was given")
    info = verify_event_log(evidence.event_log, report.rtmr3)
    if info.compose_hash is None:
        raise EventLogError("the event log has no compose-hash system event")
    _check_listed("dstack compose hash", info.compose_hash, policy.compose_hashes)
    if policy.app_ids:
        if info.app_id is None:
            raise EventLogError("the event log has no app-id system event")
        _check_listed("dstack app id", info.app_id, policy.app_ids)
    return info


def _check_sgx(report: QuoteReport, policy: Policy) -> None:
    if not policy.mrenclave and not policy.mrsigner:
        raise MeasurementError("SGX quote, but the policy lists no MRENCLAVE or MRSIGNER")
    if policy.mrenclave:
        _check_listed("MRENCLAVE", report.mrenclave, policy.mrenclave)
    if policy.mrsigner:
        _check_listed("MRSIGNER", report.mrsigner, policy.mrsigner)


def _check_listed(name: str, value: bytes | None, allowed: frozenset[bytes]) -> None:
    if value is None or value not in allowed:
        shown = value.hex() if value is not None else "missing"
        raise MeasurementError(
            f"{name} {shown} is not allowed by the policy ({len(allowed)} value(s) listed)"
        )


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
    if evidence.tee_type == "simulated":
        if not policy.allow_simulated:
            raise SimulatedRefused(
                "simulated evidence (no TEE) is refused; pass --allow-simulated to accept it"
            )
        simulated = verify_simulated_quote(evidence.quote)
        if policy.simulated_keys and simulated.public_key not in policy.simulated_keys:
            raise MeasurementError(
                f"simulated key {simulated.public_key.hex()} is not listed by the policy"
            )
        quoted_report_data = simulated.report_data
        measurements["simulated_key"] = simulated.public_key.hex()
        warnings.append(INSECURE_LABEL)
    elif evidence.tee_type in ("tdx", "sgx"):
        if collateral is None:
            raise CollateralError("a TDX/SGX quote needs collateral (--collateral or --pccs-url)")
        report = verify_quote(evidence.quote, collateral, int(now))
        if report.tee_type != evidence.tee_type:
            raise VerificationError(
                f"evidence says {evidence.tee_type}, quote is {report.tee_type}"
            )
        info = check_report(report, evidence, policy)
        quoted_report_data = report.report_data
        measurements = report.measurements()
    else:
        raise VerificationError(f"{evidence.tee_type} evidence cannot be verified by this verifier")
    expected_rd = report_data_for(public_key_der(cert), manifest_hash, bundle.sealing_public_key)
    if not hmac.compare_digest(expected_rd, quoted_report_data):
        raise BindingError(
            "report_data in the quote does not commit to this certificate, manifest and "
            "sealing key (evidence from another node or another shard)"
        )
    _check_manifest(bundle.manifest, expected_manifest_hash, policy)
    return VerifiedNode(
        provider=evidence.provider,
        tee_type=evidence.tee_type,
        insecure=evidence.insecure,
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
