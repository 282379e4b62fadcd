"""A node's side of attestation: its own evidence, and verifying the next node.

Before the first byte of a session goes downstream, the node fetches the next
node's attestation chain with a fresh nonce, verifies the first bundle against
its policy (quote, measurements, report_data binding, expected manifest, nonce
signature) and pins exactly that certificate for the WebSocket. This runs on
every (re)connection. Attestation failures are never retried silently: they
surface as ``attestation_failed`` errors naming the reason.
"""

from __future__ import annotations

import asyncio
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
    NodeAttestation,
    Policy,
    collateral_source,
    fetch_chain_async,
    verify_bundle,
)
from teeshard.node import DownstreamError
from teeshard.server.config import NodeConfig

log = logging.getLogger(__name__)


def trust_for(config: NodeConfig, attestation: NodeAttestation) -> NodeTrust:
    """The node's trust state: its attestation, and what it asks of the next node."""
    policy = Policy.load(config.policy_path, allow_simulated=config.allow_simulated)
    return NodeTrust(
        attestation, policy, collateral_source(config.collateral_path, config.pccs_url)
    )


@dataclass
class NodeTrust:
    attestation: NodeAttestation
    policy: Policy
    collateral: CollateralSource | None = None
    # The attestation bundles of the nodes after this one, as the next node presented
    # them at our last connection (JSON): served on /v1/attestation/chain.
    downstream_bundles: list[dict[str, Any]] = field(default_factory=list)

    def attestation_chain(self, nonce_hex: str) -> dict[str, Any]:
        """This node's bundle for ``nonce`` followed by the bundles of the nodes after it."""
        return {"bundles": [self.attestation.bundle_json(nonce_hex), *self.downstream_bundles]}

    async def attest_next(self, url: str) -> ssl.SSLContext:
        """Verify the node at ``url`` (wss://) and return a context pinned to its certificate."""
        nonce = secrets.token_bytes(NONCE_BYTES)
        try:
            bundles = await fetch_chain_async(url, nonce)
            node = await asyncio.to_thread(
                verify_bundle,
                Bundle.from_json(bundles[0]),
                self.policy,
                nonce=nonce,
                collateral=self.collateral,
            )
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
        self.downstream_bundles = list(bundles)
        log.info(
            "next node %s attested: %s%s, layers %s, manifest %s, certificate %s",
            url, node.provider, " (INSECURE simulated)" if node.insecure else "",
            node.manifest.layers, node.manifest_hash.hex()[:16], node.fingerprint.hex()[:16],
        )  # fmt: skip
        return node.pinned_ssl_context()

    def summary(self) -> dict[str, Any]:
        evidence = self.attestation.evidence
        return {
            "provider": evidence.provider,
            "insecure": evidence.insecure,
            "manifest_hash": self.attestation.manifest.combined_hash.hex(),
            "certificate_sha256": self.attestation.identity.fingerprint.hex(),
        }
