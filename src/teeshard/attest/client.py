"""Talking to attested nodes: fetch and verify a bundle, pin its certificate, seal requests.

Fetching the bundle itself needs no trusted channel: the bundle authenticates
itself (quote, report_data binding, signature over our fresh nonce). That is why
the first request may accept any TLS certificate; everything after it uses the
attested certificate only (:class:`AttestedPeer.ssl_context`) or the attested
sealing key (:class:`~teeshard.attest.sealed_client.SealedClient`). Because anyone
may answer that first request, what it answers is read under caps (``MAX_*_BYTES``):
a larger answer, or a larger event log, is refused with :class:`FormatError` and not
read any further.
"""

from __future__ import annotations

import asyncio
import json
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
from teeshard.attest.verify.dstack_eventlog import MAX_EVENT_LOG_BYTES
from teeshard.attest.verify.policy import Policy
from teeshard.attest.verify.quote import Collateral, CollateralSource

ATTESTATION_PATH = "/v1/attestation"
CHAIN_PATH = "/v1/attestation/chain"  # a node's bundle, then those of the nodes after it
NONCE_BYTES = 32
# Caps on what a node may make a verifier read. A bundle is a quote (~5-10 KB), a
# certificate, the manifest (~150 bytes per tensor: 1 MiB is ~7000 tensors) and the
# event log (dstack's boot log is a few KB). An answer over a cap is refused unread.
MAX_BUNDLE_BYTES = 4 << 20
MAX_CHAIN_BUNDLES = 64
MAX_CHAIN_BYTES = 16 << 20
IDENTITY = {"accept-encoding": "identity"}


def attestation_url(url: str, nonce: bytes, path: str = ATTESTATION_PATH) -> str:
    """``path?nonce=HEX`` on the node behind ``url`` (http(s) or ws(s))."""
    parts = urlsplit(url)
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme, parts.scheme)
    if scheme not in ("http", "https"):
        raise FormatError(f"{url}: expected an http(s):// or ws(s):// URL")
    return urlunsplit((scheme, parts.netloc, path, f"nonce={nonce.hex()}", ""))


def _check_status(response: httpx.Response) -> None:
    if response.status_code != 200:
        raise AttestationError(
            f"{response.request.url}: attestation endpoint answered HTTP {response.status_code}"
        )


def _shown(response: httpx.Response) -> str:
    """The endpoint, without our nonce."""
    return str(response.request.url.copy_with(query=None))


def _declared_size(response: httpx.Response, limit: int) -> None:
    # A compressed answer could inflate to gigabytes inside one chunk, before any
    # count: we ask for none (IDENTITY) and refuse one.
    encoding = response.headers.get("content-encoding", "identity").strip().lower()
    if encoding != "identity":
        raise FormatError(f"{_shown(response)}: refused a {encoding}-encoded attestation answer")
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise FormatError(
            f"{_shown(response)}: refused a {declared}-byte attestation answer "
            f"(limit {limit} bytes)"
        )


def _over(response: httpx.Response, limit: int) -> FormatError:
    return FormatError(
        f"{_shown(response)}: the attestation answer is larger than {limit} bytes; stopped reading"
    )


def _read_capped(response: httpx.Response, limit: int) -> bytes:
    """The body of a streamed response, refusing (and not reading on) past ``limit`` bytes."""
    _check_status(response)
    _declared_size(response, limit)
    body = bytearray()
    for chunk in response.iter_bytes():  # identity-encoded: the raw bytes
        body += chunk
        if len(body) > limit:
            raise _over(response, limit)
    return bytes(body)


async def _aread_capped(response: httpx.Response, limit: int) -> bytes:
    _check_status(response)
    _declared_size(response, limit)
    body = bytearray()
    async for chunk in response.aiter_bytes():
        body += chunk
        if len(body) > limit:
            raise _over(response, limit)
    return bytes(body)


def _check_event_log(url: str, item: object) -> None:
    evidence = item.get("evidence") if isinstance(item, dict) else None
    log = evidence.get("event_log") if isinstance(evidence, dict) else None
    if isinstance(log, str) and len(log) > MAX_EVENT_LOG_BYTES:
        raise FormatError(
            f"{url}: refused an event log of {len(log)} characters (limit {MAX_EVENT_LOG_BYTES})"
        )


def _parse_chain(url: str, body: bytes) -> list[dict[str, Any]]:
    try:
        bundles = json.loads(body)["bundles"]
    except (ValueError, KeyError, TypeError) as exc:
        raise FormatError(f"{url}: not an attestation chain: {exc}") from None
    if not isinstance(bundles, list) or not bundles:
        raise FormatError(f"{url}: the attestation chain is empty")
    if len(bundles) > MAX_CHAIN_BUNDLES:
        raise FormatError(f"{url}: {len(bundles)} bundles; at most {MAX_CHAIN_BUNDLES} are read")
    for item in bundles:
        _check_event_log(url, item)
    return bundles


def _parse_bundle(url: str, body: bytes) -> Bundle:
    try:
        data = json.loads(body)
    except ValueError as exc:
        raise FormatError(f"{url}: bundle is not JSON: {exc}") from None
    _check_event_log(url, data)
    return Bundle.from_json(data)


def fetch_chain(
    url: str, nonce: bytes, *, timeout: float = 30.0, max_bytes: int = MAX_CHAIN_BYTES
) -> list[dict[str, Any]]:
    """The JSON bundles of ``url``'s node and every node after it, unverified.

    The first answers ``nonce``; the others answered the nonces of the nodes
    that attested them. Parse each with :meth:`Bundle.from_json` and verify it.
    An answer over ``max_bytes`` (or an event log over MAX_EVENT_LOG_BYTES) is
    refused with FormatError, without reading the rest.
    """
    target = attestation_url(url, nonce, CHAIN_PATH)
    with (
        httpx.Client(verify=False, timeout=timeout) as client,  # see the module docstring
        client.stream("GET", target, headers=IDENTITY) as response,
    ):
        return _parse_chain(target, _read_capped(response, max_bytes))


async def fetch_chain_async(
    url: str, nonce: bytes, *, http_timeout_s: float = 30.0, max_bytes: int = MAX_CHAIN_BYTES
) -> list[dict[str, Any]]:
    target = attestation_url(url, nonce, CHAIN_PATH)
    async with (
        httpx.AsyncClient(verify=False, timeout=http_timeout_s) as client,
        client.stream("GET", target, headers=IDENTITY) as response,
    ):
        return _parse_chain(target, await _aread_capped(response, max_bytes))


def fetch_bundle(
    url: str,
    nonce: bytes,
    *,
    client: httpx.Client | None = None,
    timeout: float = 30.0,
    max_bytes: int = MAX_BUNDLE_BYTES,
) -> Bundle:
    target = attestation_url(url, nonce)
    if client is not None:
        with client.stream("GET", target, headers=IDENTITY) as response:
            return _parse_bundle(target, _read_capped(response, max_bytes))
    # verify=False: see the module docstring; nothing is trusted before verify_bundle.
    with (
        httpx.Client(verify=False, timeout=timeout) as own,
        own.stream("GET", target, headers=IDENTITY) as response,
    ):
        return _parse_bundle(target, _read_capped(response, max_bytes))


async def fetch_bundle_async(
    url: str,
    nonce: bytes,
    *,
    client: httpx.AsyncClient | None = None,
    http_timeout_s: float = 30.0,
    max_bytes: int = MAX_BUNDLE_BYTES,
) -> Bundle:
    target = attestation_url(url, nonce)
    if client is not None:
        async with client.stream("GET", target, headers=IDENTITY) as response:
            return _parse_bundle(target, await _aread_capped(response, max_bytes))
    async with (
        httpx.AsyncClient(verify=False, timeout=http_timeout_s) as own,
        own.stream("GET", target, headers=IDENTITY) as response,
    ):
        return _parse_bundle(target, await _aread_capped(response, max_bytes))


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
