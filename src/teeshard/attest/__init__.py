"""Attestation for teeshard nodes: evidence, manifests, verification, receipts, sealing.

The public surface, by who calls it:

Node side
    :class:`ManifestBuilder` (hook for ``load_shard``), :func:`compute_manifest`,
    :class:`ManifestCache`, :func:`select_provider`, :class:`NodeIdentity`,
    :class:`NodeAttestation` (bundle per nonce, receipts), :func:`open_request`.
Verifier side
    :class:`Policy`, :func:`verify_bundle` → :class:`VerifiedNode` (with a pinned
    TLS context), :func:`attest_peer`, :func:`verify_chain`, :class:`SealedClient`,
    :func:`verify_quote`, :class:`CollateralFile`, :class:`PccsCollateral`.
Errors
    :mod:`teeshard.attest.errors` (tree in its docstring).
"""

from teeshard.attest.attester import NodeAttestation
from teeshard.attest.client import AttestedPeer, attest_peer, fetch_bundle, verify_url
from teeshard.attest.entry_files import EntryFiles, hash_entry_files
from teeshard.attest.errors import AttestationError, VerificationError
from teeshard.attest.evidence import Bundle, Evidence, report_data_for
from teeshard.attest.identity import NodeIdentity, cert_fingerprint, pinned_client_context
from teeshard.attest.manifest import ManifestBuilder, ShardManifest, compute_manifest
from teeshard.attest.manifest_cache import ManifestCache
from teeshard.attest.providers import TEE_CHOICES, Provider, select_provider
from teeshard.attest.receipts import (
    RECEIPT_DIGEST_HEADER,
    RECEIPTS_FIELD,
    Receipt,
    TrafficHash,
    chain_digest,
    sign_receipt,
    verify_chain,
)
from teeshard.attest.replay import ReplayCache
from teeshard.attest.response import ResponseClaims, parse_response, verify_response
from teeshard.attest.sealed_client import SealedClient
from teeshard.attest.sealed_stream import ResponseReader, ResponseSealer, SealedResponse
from teeshard.attest.sealing import (
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

__all__ = [
    "RECEIPTS_FIELD",
    "RECEIPT_DIGEST_HEADER",
    "SEALED_CONTENT_TYPE",
    "SEALED_PATH",
    "TEE_CHOICES",
    "AttestationError",
    "AttestedPeer",
    "Bundle",
    "CollateralFile",
    "EntryFiles",
    "Evidence",
    "ManifestBuilder",
    "ManifestCache",
    "NodeAttestation",
    "NodeIdentity",
    "OpenedRequest",
    "PccsCollateral",
    "Policy",
    "Provider",
    "Receipt",
    "ReplayCache",
    "ResponseClaims",
    "ResponseReader",
    "ResponseSealer",
    "SealedClient",
    "SealedResponse",
    "ShardManifest",
    "TrafficHash",
    "VerificationError",
    "VerifiedNode",
    "attest_peer",
    "cert_fingerprint",
    "chain_digest",
    "compute_manifest",
    "fetch_bundle",
    "hash_entry_files",
    "open_request",
    "parse_response",
    "pinned_client_context",
    "report_data_for",
    "seal_request",
    "select_provider",
    "sign_receipt",
    "verify_bundle",
    "verify_chain",
    "verify_quote",
    "verify_response",
    "verify_url",
]
