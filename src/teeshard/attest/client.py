"""Talking to attested nodes: fetch and verify a bundle, pin its certificate, seal requests.

Fetching the bundle itself needs no trusted channel: the bundle authenticates
itself (quote, report_data binding, signature over our fresh nonce). That is why
the first request may accept any TLS certificate; everything after it uses the
attested certificate only (:class:`AttestedPeer.ssl_context`) or the attested
sealing key (:class:`~teeshard.attest.sealed_client.SealedClient`).
"""

from __future__ import annotations

import asyncio
import secrets
import ssl
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx

from teeshard.attest.errors import AttestationError, FormatError
from teeshard.attest.evidence import Bundle
from teeshard.attest.identity import NodeIdentity
from teeshard.attest.verify.bundle import VerifiedNode, verify_bundle
from teeshard.attest.verify.policy import Policy
from teeshard.attest.verify.quote import Collateral, CollateralSource

ATTESTATION_PATH = "/v1/attestation"
CHAIN_PATH = "/v1/attestation/chain"  # a node's bundle, then those of the nodes after it
NONCE_BYTES = 32


def attestation_url(url: str, nonce: bytes, path: str = ATTESTATION_PATH) -> str:
    """``path?nonce=HEX`` on the node behind ``url`` (http(s) or ws(s))."""
    parts = urlsplit(url)
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme, parts.scheme)
    if scheme not in ("http", "https"):
        raise FormatError(f"{url}: expected an http(s):// or ws(s):// URL")
    return urlunsplit((scheme, parts.netloc, path, f"nonce={nonce.hex()}", ""))


def _parse_chain(response: httpx.Response) -> list[dict[str, Any]]:
    if response.status_code != 200:
        raise AttestationError(
            f"{response.request.url}: attestation endpoint answered HTTP {response.status_code}"
        )
    try:
        bundles = response.json()["bundles"]
    except (ValueError, KeyError, TypeError) as exc:
        raise FormatError(f"{response.request.url}: not an attestation chain: {exc}") from None
    if not isinstance(bundles, list) or not bundles:
        raise FormatError(f"{response.request.url}: the attestation chain is empty")
    return bundles


def fetch_chain(url: str, nonce: bytes, *, timeout: float = 30.0) -> list[dict[str, Any]]:
    """The JSON bundles of ``url``'s node and every node after it, unverified.

    The first answers ``nonce``; the others answered the nonces of the nodes
    that attested them. Parse each with :meth:`Bundle.from_json` and verify it.
    """
    with httpx.Client(verify=False, timeout=timeout) as client:  # see the module docstring
        return _parse_chain(client.get(attestation_url(url, nonce, CHAIN_PATH)))


async def fetch_chain_async(
    url: str, nonce: bytes, *, http_timeout_s: float = 30.0
) -> list[dict[str, Any]]:
    async with httpx.AsyncClient(verify=False, timeout=http_timeout_s) as client:
        return _parse_chain(await client.get(attestation_url(url, nonce, CHAIN_PATH)))


def _parse_bundle(response: httpx.Response) -> Bundle:
    if response.status_code != 200:
        raise AttestationError(
            f"{response.request.url}: attestation endpoint answered HTTP {response.status_code}"
        )
    return Bundle.loads(response.content)


def fetch_bundle(
    url: str, nonce: bytes, *, client: httpx.Client | None = None, timeout: float = 30.0
) -> Bundle:
    target = attestation_url(url, nonce)
    if client is not None:
        return _parse_bundle(client.get(target))
    # verify=False: see the module docstring; nothing is trusted before verify_bundle.
    with httpx.Client(verify=False, timeout=timeout) as own:
        return _parse_bundle(own.get(target))


async def fetch_bundle_async(
    url: str, nonce: bytes, *, client: httpx.AsyncClient | None = None, http_timeout_s: float = 30.0
) -> Bundle:
    target = attestation_url(url, nonce)
    if client is not None:
        return _parse_bundle(await client.get(target))
    async with httpx.AsyncClient(verify=False, timeout=http_timeout_s) as own:
        return _parse_bundle(await own.get(target))


@dataclass(frozen=True)
class AttestedPeer:
    """A verified downstream node and the TLS context that accepts only its certificate."""

    url: str
    node: VerifiedNode
    ssl_context: ssl.SSLContext | None  # None for a plain ws:// or http:// URL (no TLS to pin)


def _peer(url: str, node: VerifiedNode, client_identity: NodeIdentity | None) -> AttestedPeer:
    secure = urlsplit(url).scheme in ("wss", "https")
    return AttestedPeer(url, node, node.pinned_ssl_context(client_identity) if secure else None)


def verify_url(
    url: str,
    policy: Policy,
    *,
    expected_manifest_hash: bytes | None = None,
    collateral: Collateral | CollateralSource | None = None,
    client_identity: NodeIdentity | None = None,
    timeout: float = 30.0,
) -> tuple[AttestedPeer, Bundle]:
    """Fetch ``url``'s bundle with a fresh nonce and verify it (blocking)."""
    nonce = secrets.token_bytes(NONCE_BYTES)
    bundle = fetch_bundle(url, nonce, timeout=timeout)
    node = verify_bundle(
        bundle, policy, nonce=nonce, expected_manifest_hash=expected_manifest_hash,
        collateral=collateral,
    )  # fmt: skip
    return _peer(url, node, client_identity), bundle


async def attest_peer(
    url: str,
    policy: Policy,
    *,
    expected_manifest_hash: bytes | None = None,
    collateral: Collateral | CollateralSource | None = None,
    client_identity: NodeIdentity | None = None,
    http_timeout_s: float = 30.0,
) -> AttestedPeer:
    """Before sending anything to ``url``: fetch, verify, and pin its attested certificate.

    Use as ``peer = await attest_peer("wss://b:8001", policy, expected_manifest_hash=h)``
    then ``websockets.connect("wss://b:8001/pipeline", ssl=peer.ssl_context)``.
    """
    nonce = secrets.token_bytes(NONCE_BYTES)
    bundle = await fetch_bundle_async(url, nonce, http_timeout_s=http_timeout_s)
    node = await asyncio.to_thread(
        verify_bundle, bundle, policy, nonce=nonce,
        expected_manifest_hash=expected_manifest_hash, collateral=collateral,
    )  # fmt: skip
    return _peer(url, node, client_identity)
