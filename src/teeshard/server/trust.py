"""A node's side of attestation: its own evidence, and verifying its neighbours.

Downstream: before the first byte of a session goes to the next node, this node
fetches the next node's attestation chain with a fresh nonce, verifies the first
bundle against its policy (quote, measurements, report_data binding, expected
manifest, nonce signature) and pins exactly that certificate for the WebSocket.
This runs on every (re)connection.

Upstream, in both directions of each connection: the next node challenges this
one, and ``introduce`` answers with this node's bundle for a nonce derived from
the challenge and the certificate this connection reached; ``verify_upstream``
is the same check from the other side, plus: the upstream's manifest must be
the one the policy expects for the layers that end exactly where this node's
begin. Attestation failures are never retried silently: they surface as
``attestation_failed`` errors naming the reason.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import secrets
import ssl
from dataclasses import dataclass, field
from typing import Any

import httpx

from teeshard.attest import (
    NONCE_BYTES,
    AttestationError,
    Bundle,
    CollateralSource,
    FormatError,
    ManifestMismatch,
    NodeAttestation,
    Policy,
    VerificationError,
    VerifiedNode,
    cert_fingerprint,
    collateral_source,
    fetch_chain_async,
    verify_bundle,
)
from teeshard.entry.registry import ProbeAttestationError, ProbeResult
from teeshard.node import DownstreamError, Upstream
from teeshard.offload import OffloadError, check_node_offload
from teeshard.server.config import NodeConfig

log = logging.getLogger(__name__)


_UPSTREAM_DOMAIN = b"teeshard/upstream-introduction/v1\0"


def upstream_nonce(challenge: bytes, downstream_fingerprint: bytes) -> bytes:
    """The nonce an upstream's bundle answers: bound to the challenge and to the
    downstream certificate of this very connection, so it cannot be relayed."""
    return hashlib.sha256(_UPSTREAM_DOMAIN + challenge + downstream_fingerprint).digest()


def check_offload(policy: Policy, node: VerifiedNode) -> None:
    """The policy's word on the node's TSQP offload (mode, accelerator keys), as an
    attestation failure: a node that offloads against the policy is refused like any."""
    try:
        check_node_offload(policy.offload, node.manifest.offload, policy.accelerator_keys)
    except OffloadError as exc:
        raise VerificationError(f"offload: {exc}") from None


def trust_for(config: NodeConfig, attestation: NodeAttestation) -> NodeTrust:
    """The node's trust state: its attestation, what it asks of the next node and of
    the previous one (the same policy file unless ``upstream_policy_path`` is given)."""
    policy = Policy.load(config.policy_path, allow_simulated=config.allow_simulated_next_hop)
    upstream = Policy.load(config.upstream_policy_path or config.policy_path)
    collateral = collateral_source(config.collateral_path, config.pccs_url)
    return NodeTrust(attestation, policy, collateral, upstream_policy=upstream)


@dataclass
class NodeTrust:
    attestation: NodeAttestation
    policy: Policy
    collateral: CollateralSource | None = None
    # The attestation bundles of the nodes after this one, as the next node presented
    # them at our last connection (JSON): served on /v1/attestation/chain.
    downstream_bundles: list[dict[str, Any]] = field(default_factory=list)
    upstream_policy: Policy | None = None  # what a previous node must show; None: ``policy``

    def attestation_chain(self, nonce_hex: str) -> dict[str, Any]:
        """This node's bundle for ``nonce`` followed by the bundles of the nodes after it."""
        return {"bundles": [self.attestation.bundle_json(nonce_hex), *self.downstream_bundles]}

    async def attest_next(self, url: str) -> ssl.SSLContext:
        """Verify the node at ``url`` (wss://) and return a context pinned to its certificate."""
        try:
            node, bundles = await self._verify_downstream(url)
        except AttestationError as exc:
            log.error("next node %s failed attestation: %s", url, exc)
            raise DownstreamError(
                f"next node {url} failed attestation: {exc}", code="attestation_failed"
            ) from None
        except httpx.TransportError as exc:
            # unreachable is not untrusted: the same error as any other lost next hop
            raise DownstreamError(f"next node unavailable: cannot reach {url}: {exc}") from None
        except httpx.HTTPError as exc:
            raise DownstreamError(
                f"next node {url} sent no valid attestation: {exc}", code="attestation_failed"
            ) from None
        own = self.attestation.manifest
        if node.manifest.model != own.model or node.manifest.layers.start != own.layers.end:
            # a route may name any node: it must serve exactly the layers after this one's
            log.error("next node %s serves layers %s, not those after %s", url,
                      node.manifest.layers, own.layers)  # fmt: skip
            raise DownstreamError(
                f"next node {url} serves {node.manifest.model} layers {node.manifest.layers}, "
                f"which do not follow {own.model} layers {own.layers}",
                code="attestation_failed",
            )
        self.downstream_bundles = list(bundles)
        log.info(
            "next node %s attested: %s%s, layers %s, manifest %s, certificate %s",
            url, node.provider, " (INSECURE simulated)" if node.insecure else "",
            node.manifest.layers, node.manifest_hash.hex()[:16], node.fingerprint.hex()[:16],
        )  # fmt: skip
        return node.pinned_ssl_context()

    async def introduce(self, challenge: bytes, downstream_certificate_der: bytes) -> bytes:
        """Answer the next node's challenge: this node's bundle, as JSON bytes."""
        nonce = upstream_nonce(challenge, cert_fingerprint(downstream_certificate_der))
        return json.dumps(self.attestation.bundle(nonce).to_json()).encode()

    async def verify_upstream(self, challenge: bytes, bundle: bytes) -> Upstream:
        """Admit a previous node: its bundle for our challenge, against our upstream policy."""
        try:
            parsed = Bundle.from_json(json.loads(bundle))
        except (ValueError, TypeError) as exc:
            raise FormatError(f"the introduction is not an attestation bundle: {exc}") from None
        nonce = upstream_nonce(challenge, self.attestation.identity.fingerprint)
        policy = self.upstream_policy or self.policy
        node = await asyncio.to_thread(
            verify_bundle, parsed, policy, nonce=nonce, collateral=self.collateral
        )
        check_offload(policy, node)
        own = self.attestation.manifest
        if node.manifest.model != own.model or node.manifest.layers.end != own.layers.start:
            raise ManifestMismatch(
                f"an upstream serving {node.manifest.model} layers {node.manifest.layers} "
                f"cannot feed {own.model} layers {own.layers}"
            )
        return Upstream(
            fingerprint=node.fingerprint.hex(),
            description=(
                f"{node.provider}{' (INSECURE simulated)' if node.insecure else ''}, layers "
                f"{node.manifest.layers}, manifest {node.manifest_hash.hex()[:16]}, "
                f"certificate {node.fingerprint.hex()[:16]}"
            ),
        )

    async def probe(self, url: str) -> ProbeResult:
        """The registry's check of a node (``wss://host:port``): attested with this node's
        policy, for this model. ``ProbeAttestationError`` when refused, ``OSError`` when
        unreachable. The hop's own check still runs before any frame goes to it."""
        try:
            node, _ = await self._verify_downstream(url, http_timeout_s=5.0)
        except AttestationError as exc:
            raise ProbeAttestationError(str(exc)) from None
        except httpx.TransportError as exc:
            raise OSError(f"cannot reach {url}: {exc}") from None
        except httpx.HTTPError as exc:
            raise ProbeAttestationError(f"no valid attestation: {exc}") from None
        if node.manifest.model != self.attestation.manifest.model:
            raise ProbeAttestationError(f"serves model {node.manifest.model}")
        return ProbeResult(node.fingerprint.hex(), node.manifest.layers, node.certificate_pem)

    async def _verify_downstream(
        self, url: str, http_timeout_s: float = 30.0
    ) -> tuple[VerifiedNode, list[dict[str, Any]]]:
        """Fetch the chain at ``url`` for a fresh nonce; verify its first bundle (the node
        itself) against the policy, offload included. Raises attestation and HTTP errors."""
        nonce = secrets.token_bytes(NONCE_BYTES)
        bundles = await fetch_chain_async(url, nonce, http_timeout_s=http_timeout_s)
        node = await asyncio.to_thread(
            verify_bundle,
            Bundle.from_json(bundles[0]),
            self.policy,
            nonce=nonce,
            collateral=self.collateral,
        )
        check_offload(self.policy, node)
        return node, bundles

    def summary(self) -> dict[str, Any]:
        evidence = self.attestation.evidence
        return {
            "provider": evidence.provider,
            "insecure": evidence.insecure,
            "manifest_hash": self.attestation.manifest.combined_hash.hex(),
            "certificate_sha256": self.attestation.identity.fingerprint.hex(),
        }
