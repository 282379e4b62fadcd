"""Every error the attestation library raises.

Callers catch :class:`AttestationError` to handle all of them; the subclasses say
exactly what failed, and their message is the precise reason shown to a person::

    AttestationError
    ├── ProviderError               no evidence could be produced on this machine
    │   └── ProviderUnavailable     the requested TEE interface is not present
    ├── ManifestError               a shard manifest could not be computed or is malformed
    ├── FormatError (ValueError)    a bundle, evidence, receipt or policy is not well formed
    │   └── PolicyError             a policy file is invalid
    ├── VerificationError           evidence was checked and refused
    │   ├── CollateralError         no usable collateral for the quote
    │   ├── QuoteError              dcap-qvl rejected the quote (signature, chain, dates)
    │   ├── TcbStatusError          the platform's TCB status is not allowed by the policy
    │   ├── MeasurementError        a measurement (MRTD, RTMRs, MRENCLAVE, ...) is not allowed
    │   ├── EventLogError           the dstack event log does not replay to the quoted RTMR3
    │   ├── BindingError            report_data does not bind this certificate and manifest
    │   ├── ManifestMismatch        the attested manifest is not the expected one
    │   ├── FreshnessError          wrong nonce, stale signature, expired certificate
    │   ├── SignatureError          a signature does not verify under the attested key
    │   └── SimulatedRefused        simulated (insecure) evidence and the policy forbids it
    ├── ReceiptError                a receipt chain does not verify
    └── SealingError                a sealed (HPKE) message cannot be opened
        ├── StaleRequest            a sealed request outside the time window
        ├── ReplayedRequest         a sealed request seen before
        ├── ReplayCacheFull         too many sealed requests in the window (retry later)
        └── SealedRequestRefused    the node refused a sealed request (HTTP status, reason)

Attestation failures are final: never retry them as if they were transport errors.
"""

from __future__ import annotations


class AttestationError(Exception):
    """Base class of every error raised by :mod:`teeshard.attest`."""


class ProviderError(AttestationError):
    """A TEE provider failed to produce evidence."""


class ProviderUnavailable(ProviderError):
    """The requested provider's device, socket or file system is not present."""


class ManifestError(AttestationError):
    """A shard manifest could not be computed, or its contents are inconsistent."""


class FormatError(AttestationError, ValueError):
    """A serialized object is malformed: missing or unknown fields, bad hex, bad lengths."""


class PolicyError(FormatError):
    """A verification policy file is invalid."""


class VerificationError(AttestationError):
    """Evidence was checked and refused; the message names the check that failed."""


class CollateralError(VerificationError):
    """Collateral for a quote could not be loaded or fetched."""


class QuoteError(VerificationError):
    """The quote's signature chain, collateral or dates did not verify."""


class TcbStatusError(VerificationError):
    """The platform's TCB status is not in the policy's allowed statuses."""


class MeasurementError(VerificationError):
    """A measured value is not listed by the policy."""


class EventLogError(VerificationError):
    """The event log is malformed or does not replay to the quoted register."""


class BindingError(VerificationError):
    """The quote's report_data does not commit to the presented key and manifest."""


class ManifestMismatch(VerificationError):
    """The attested shard manifest is not the one expected."""


class FreshnessError(VerificationError):
    """The evidence is not fresh: wrong nonce, too old, or the certificate is out of date."""


class SignatureError(VerificationError):
    """A signature does not verify under the attested key."""


class SimulatedRefused(VerificationError):
    """Simulated evidence was presented and the verifier was not told to accept it."""


class ReceiptError(AttestationError):
    """A receipt chain is altered, reordered, incomplete or signed by the wrong key."""


class SealingError(AttestationError):
    """A sealed message could not be opened (tampered, wrong key, or malformed)."""


class StaleRequest(SealingError):
    """A sealed request's timestamp is outside the node's time window."""


class ReplayedRequest(SealingError):
    """A sealed request's id was seen within the time window: a replay."""


class ReplayCacheFull(SealingError):
    """The replay cache is full of live entries; the node refuses rather than forget."""


class SealedRequestRefused(SealingError):
    """The entry node answered a sealed request with an HTTP error (before sealing)."""

    def __init__(self, message: str, status: int, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
