"""Attestation for teeshard nodes: evidence, manifests, verification, receipts, sealing.

The public surface, by who calls it:

Node side
    :class:`ManifestBuilder` (hook for ``load_shard``), :func:`compute_manifest`,
    :class:`ManifestCache`, :func:`select_provider`, :class:`NodeIdentity`,
    :class:`NodeAttestation` (bundle per nonce, receipts), :func:`open_request`.
Verifier side
    :class:`Policy`, :func:`verify_bundle` → :class:`VerifiedNode` (with a pinned
    TLS context), :func:`attest_peer`, :func:`verify_chain`, :class:`SealedClient`,
    :func:`verify_quote`, :class:`CollateralFile`, :class:`PccsCollateral`,
    :func:`verify_response` (does a receipt chain prove this answer?).
Errors
    the whole tree of :mod:`teeshard.attest.errors` (drawn in its docstring),
    rooted at :class:`AttestationError`.
"""

from teeshard.attest.attester import NodeAttestation
from teeshard.attest.client import (
    ATTESTATION_PATH,
    CHAIN_PATH,
    NONCE_BYTES,
    AttestedPeer,
    attest_peer,
    attestation_url,
    fetch_bundle,
    fetch_chain,
    fetch_chain_async,
    verify_url,
)
from teeshard.attest.entry_files import EntryFiles, hash_entry_files
from teeshard.attest.errors import (
    AttestationError,
    BindingError,
    CollateralError,
    EventLogError,
    FormatError,
    FreshnessError,
    ManifestError,
    ManifestMismatch,
    MeasurementError,
    PolicyError,
    ProviderError,
    ProviderUnavailable,
    QuoteError,
    ReceiptError,
    ReplayCacheFull,
    ReplayedRequest,
    SealedRequestRefused,
    SealingError,
    SignatureError,
    SimulatedRefused,
    StaleRequest,
    TcbStatusError,
    VerificationError,
)
from teeshard.attest.evidence import Bundle, Evidence, report_data_for
from teeshard.attest.identity import NodeIdentity, cert_fingerprint, pinned_client_context
from teeshard.attest.manifest import ManifestBuilder, ShardManifest, compute_manifest
from teeshard.attest.manifest_cache import ManifestCache
from teeshard.attest.providers import TEE_CHOICES, Provider, select_provider
from teeshard.attest.providers.simulated import simulated_public_key
from teeshard.attest.receipts import (
    RECEIPT_DIGEST_HEADER,
    RECEIPTS_FIELD,
    Receipt,
    TrafficHash,
    chain_digest,
    load_receipts,
    receipts_to_json,
    sign_receipt,
    verify_chain,
)
from teeshard.attest.replay import ReplayCache
from teeshard.attest.response import (
    EXTENSION_FIELD,
    SEGMENTS_FIELD,
    TOOL_CALL_CLOSE,
    TOOL_CALL_OPEN,
    ResponseClaims,
    ResponseReport,
    parse_choices,
    parse_response,
    response_extension,
    token_traffic_hash,
    tool_call_text,
    verify_response,
)
from teeshard.attest.sealed_client import SealedAnswer, SealedClient
from teeshard.attest.sealed_stream import (
    SEALED_STREAM_TYPE,
    ResponseReader,
    ResponseSealer,
    SealedResponse,
)
from teeshard.attest.sealing import (
    IDEMPOTENCY_HEADER,
    SEALED_CONTENT_TYPE,
    SEALED_PATH,
    OpenedRequest,
    open_request,
    seal_request,
)
from teeshard.attest.verify import (
    CollateralFile,
    PccsCollateral,
    Policy,
    VerifiedNode,
    verify_bundle,
    verify_quote,
)
from teeshard.attest.verify.policy import ManifestExpectation
from teeshard.attest.verify.quote import DEFAULT_PCCS_URL, CollateralSource, collateral_source

__all__ = [
    "ATTESTATION_PATH",
    "CHAIN_PATH",
    "DEFAULT_PCCS_URL",
    "EXTENSION_FIELD",
    "IDEMPOTENCY_HEADER",
    "NONCE_BYTES",
    "RECEIPTS_FIELD",
    "RECEIPT_DIGEST_HEADER",
    "SEALED_CONTENT_TYPE",
    "SEALED_PATH",
    "SEALED_STREAM_TYPE",
    "SEGMENTS_FIELD",
    "TEE_CHOICES",
    "TOOL_CALL_CLOSE",
    "TOOL_CALL_OPEN",
    "AttestationError",
    "AttestedPeer",
    "BindingError",
    "Bundle",
    "CollateralError",
    "CollateralFile",
    "CollateralSource",
    "EntryFiles",
    "EventLogError",
    "Evidence",
    "FormatError",
    "FreshnessError",
    "ManifestBuilder",
    "ManifestCache",
    "ManifestError",
    "ManifestExpectation",
    "ManifestMismatch",
    "MeasurementError",
    "NodeAttestation",
    "NodeIdentity",
    "OpenedRequest",
    "PccsCollateral",
    "Policy",
    "PolicyError",
    "Provider",
    "ProviderError",
    "ProviderUnavailable",
    "QuoteError",
    "Receipt",
    "ReceiptError",
    "ReplayCache",
    "ReplayCacheFull",
    "ReplayedRequest",
    "ResponseClaims",
    "ResponseReader",
    "ResponseReport",
    "ResponseSealer",
    "SealedAnswer",
    "SealedClient",
    "SealedRequestRefused",
    "SealedResponse",
    "SealingError",
    "ShardManifest",
    "SignatureError",
    "SimulatedRefused",
    "StaleRequest",
    "TcbStatusError",
    "TrafficHash",
    "VerificationError",
    "VerifiedNode",
    "attest_peer",
    "attestation_url",
    "cert_fingerprint",
    "chain_digest",
    "collateral_source",
    "compute_manifest",
    "fetch_bundle",
    "fetch_chain",
    "fetch_chain_async",
    "hash_entry_files",
    "load_receipts",
    "open_request",
    "parse_choices",
    "parse_response",
    "pinned_client_context",
    "receipts_to_json",
    "report_data_for",
    "response_extension",
    "seal_request",
    "select_provider",
    "sign_receipt",
    "simulated_public_key",
    "token_traffic_hash",
    "tool_call_text",
    "verify_bundle",
    "verify_chain",
    "verify_quote",
    "verify_response",
    "verify_url",
]
