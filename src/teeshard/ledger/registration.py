"""Registering a node in the pool: fetch its attestation bundle, verify it, check its manifest.

Flow (``register_from_url``): a fresh 32-byte nonce; ``GET {url}/v1/attestation?nonce=HEX``;
the ``BundleVerifier`` checks the bundle and returns the manifest hash it vouches
for; that hash must be one of the model's expected shard hashes; only then is
the node registered (and admitted, when the caller may admit). Anything else
raises ``RegistrationRefused`` with the reason.

The hook: ``BundleVerifier`` is what the attestation package provides. If
``teeshard.attest`` defines ``make_bundle_verifier(allow_simulated: bool) ->
BundleVerifier``, ``default_verifier`` uses it. Until then ``InterimVerifier``
checks what it can without a quote verifier — the nonce echo, the signature
over the nonce by the bundle's certificate key, and the manifest hash — and
refuses any bundle whose quote would need verifying unless told explicitly to
skip that (``insecure_skip_quote``), and simulated evidence unless allowed.
"""

from __future__ import annotations

import base64
import binascii
import importlib
import json
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import httpx
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

from teeshard.ledger.interface import (
    Ledger,
    LedgerError,
    NodeInfo,
    NodeRecord,
    Unauthorized,
    check_manifest_hash,
)


class RegistrationRefused(Exception):
    """The node was not registered; the message says why."""


@dataclass(frozen=True)
class VerifiedBundle:
    manifest_hash: str  # hex, lower case
    provider: str
    node_id: str | None = None  # as the node names itself, when the bundle says
    model: str = ""
    layers: str = ""
    notes: tuple[str, ...] = ()  # what was and was not checked


class BundleVerifier(Protocol):
    def verify(self, bundle: Mapping[str, Any], nonce: bytes) -> VerifiedBundle:
        """Return what the bundle proves, or raise RegistrationRefused with the reason."""
        ...


@dataclass(frozen=True)
class ExpectedShards:
    """The model's expected shard manifest hashes: hash -> layer range label."""

    model: str
    shards: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def load(cls, path: str | Path) -> ExpectedShards:
        """``{"model": NAME, "shards": {"0:11": HASH, ...}}`` as JSON or TOML."""
        path = Path(path)
        text = path.read_text()
        data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
        shards = data.get("shards")
        if not isinstance(shards, Mapping) or not shards:
            raise ValueError(f"{path}: expected a 'shards' table of layer range -> manifest hash")
        return cls(
            str(data.get("model", "")),
            {check_manifest_hash(h): str(layers) for layers, h in shards.items()},
        )

    @classmethod
    def of(cls, hashes: list[str], model: str = "") -> ExpectedShards:
        return cls(model, {check_manifest_hash(h): "" for h in hashes})


# -- the interim verifier ------------------------------------------------------------

_QUOTE_PROVIDERS = ("dstack", "tappd", "gramine", "sgx", "tsm", "tdx", "sev-snp", "snp")


def _bytes(value: object, what: str) -> bytes:
    if not isinstance(value, str) or not value:
        raise RegistrationRefused(f"the bundle's {what} is missing or not a string")
    text = value.removeprefix("0x")
    try:
        return bytes.fromhex(text)
    except ValueError:
        pass
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise RegistrationRefused(f"the bundle's {what} is neither hex nor base64") from None


def manifest_hash_of(bundle: Mapping[str, Any]) -> str:
    manifest = bundle.get("manifest")
    candidates = [bundle.get("manifest_hash")]
    if isinstance(manifest, Mapping):
        candidates += [manifest.get(k) for k in ("hash", "manifest_hash", "combined_hash")]
    for value in candidates:
        if isinstance(value, str) and value:
            try:
                return check_manifest_hash(value)
            except LedgerError as exc:
                raise RegistrationRefused(
                    f"the bundle's manifest hash is malformed: {exc}"
                ) from None
    raise RegistrationRefused("the bundle carries no manifest hash")


def verify_nonce_signature(bundle: Mapping[str, Any], nonce: bytes) -> str:
    """Check the signature over our nonce with the certificate's key; say what was checked."""
    signature = bundle.get("nonce_signature") or bundle.get("signature")
    certificate = bundle.get("certificate") or bundle.get("cert")
    if not signature or not certificate:
        raise RegistrationRefused(
            "the bundle has no signature over the nonce by its attested key: freshness unproven"
        )
    if not isinstance(certificate, str):
        raise RegistrationRefused("the bundle's certificate is not PEM text")
    try:
        key = x509.load_pem_x509_certificate(certificate.encode()).public_key()
    except ValueError as exc:
        raise RegistrationRefused(f"the bundle's certificate does not parse: {exc}") from None
    sig = _bytes(signature, "nonce signature")
    try:
        if isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(sig, nonce, ec.ECDSA(hashes.SHA256()))
        elif isinstance(key, ed25519.Ed25519PublicKey):
            key.verify(sig, nonce)
        elif isinstance(key, rsa.RSAPublicKey):
            key.verify(sig, nonce, padding.PKCS1v15(), hashes.SHA256())
        else:
            raise RegistrationRefused(f"unsupported certificate key type {type(key).__name__}")
    except InvalidSignature:
        raise RegistrationRefused(
            "the nonce signature does not verify with the bundle's certificate key"
        ) from None
    return "nonce signed by the certificate key"


@dataclass(frozen=True)
class InterimVerifier:
    """What can be checked before ``teeshard.attest`` lands; refuses the rest."""

    allow_simulated: bool = False
    insecure_skip_quote: bool = False

    def verify(self, bundle: Mapping[str, Any], nonce: bytes) -> VerifiedBundle:
        echoed = bundle.get("nonce")
        if echoed is not None and _bytes(echoed, "nonce") != nonce:
            raise RegistrationRefused("the bundle answers a different nonce (replayed bundle?)")
        provider = str(bundle.get("provider") or "").lower()
        notes = [verify_nonce_signature(bundle, nonce)]
        if provider == "simulated":
            if not self.allow_simulated:
                raise RegistrationRefused(
                    "the node's evidence is simulated (no TEE); pass --allow-simulated to accept it"
                )
            notes.append("INSECURE: simulated evidence accepted")
        elif provider in _QUOTE_PROVIDERS or bundle.get("quote"):
            if not self.insecure_skip_quote:
                raise RegistrationRefused(
                    f"the {provider or 'TEE'} quote cannot be verified: no quote verifier is "
                    "installed (teeshard.attest.make_bundle_verifier); pass "
                    "--insecure-skip-quote to register on the manifest hash and nonce alone"
                )
            notes.append("INSECURE: quote not verified")
        else:
            raise RegistrationRefused(f"unknown attestation provider {provider!r}")
        manifest = bundle.get("manifest")
        model = layers = ""
        if isinstance(manifest, Mapping):
            model = str(manifest.get("model", ""))
            raw = manifest.get("layers")
            if isinstance(raw, list | tuple) and len(raw) == 2:
                layers = f"{raw[0]}:{raw[1]}"
            elif isinstance(raw, str):
                layers = raw
        node_id = bundle.get("node_id")
        return VerifiedBundle(
            manifest_hash_of(bundle),
            provider,
            str(node_id) if node_id else None,
            model,
            layers,
            tuple(notes),
        )


def default_verifier(
    allow_simulated: bool = False, insecure_skip_quote: bool = False
) -> BundleVerifier:
    """The attestation package's verifier when it is installed, else ``InterimVerifier``."""
    try:
        attest = importlib.import_module("teeshard.attest")
    except ImportError:
        attest = None
    factory = getattr(attest, "make_bundle_verifier", None)
    if factory is not None:
        verifier: BundleVerifier = factory(allow_simulated=allow_simulated)
        return verifier
    return InterimVerifier(allow_simulated, insecure_skip_quote)


# -- registration --------------------------------------------------------------------


@dataclass(frozen=True)
class Registered:
    node: NodeRecord
    verified: VerifiedBundle
    admitted: bool


def fetch_bundle(url: str, nonce: bytes, timeout_s: float = 15.0) -> Mapping[str, Any]:
    endpoint = url.rstrip("/") + "/v1/attestation"
    try:
        response = httpx.get(endpoint, params={"nonce": nonce.hex()}, timeout=timeout_s)
    except httpx.HTTPError as exc:
        raise RegistrationRefused(
            f"could not fetch the attestation bundle from {endpoint}: {exc}"
        ) from None
    if response.status_code != 200:
        raise RegistrationRefused(
            f"{endpoint} answered HTTP {response.status_code}: no attestation bundle"
        )
    try:
        bundle = response.json()
    except ValueError:
        raise RegistrationRefused(f"{endpoint} did not return JSON") from None
    if not isinstance(bundle, Mapping):
        raise RegistrationRefused(f"{endpoint} returned JSON that is not an object")
    return bundle


def verify_node(
    url: str, expected: ExpectedShards, verifier: BundleVerifier | None = None
) -> VerifiedBundle:
    """Fetch the bundle with a fresh nonce, verify it, check the manifest is an expected shard."""
    nonce = os.urandom(32)
    verified = (verifier or default_verifier()).verify(fetch_bundle(url, nonce), nonce)
    if verified.manifest_hash not in expected.shards:
        known = ", ".join(f"{v or '?'}={h[:12]}…" for h, v in expected.shards.items())
        raise RegistrationRefused(
            f"the node's manifest hash {verified.manifest_hash} is not an expected shard of "
            f"{expected.model or 'the model'} (expected: {known})"
        )
    return verified


def admit_from_url(
    ledger: Ledger,
    url: str,
    expected: ExpectedShards,
    verifier: BundleVerifier | None = None,
    *,
    node_id: str | None = None,
) -> NodeRecord:
    """An entry node (or the owner) admits a registered node after verifying it itself."""
    verified = verify_node(url, expected, verifier)
    name = node_id or verified.node_id or urlsplit(url).netloc
    try:
        return ledger.admit_node(name, verified.manifest_hash)
    except LedgerError as exc:
        raise RegistrationRefused(f"the ledger refused the admission: {exc}") from None


def register_from_url(
    ledger: Ledger,
    url: str,
    expected: ExpectedShards,
    verifier: BundleVerifier | None = None,
    *,
    node_id: str | None = None,
) -> Registered:
    verified = verify_node(url, expected, verifier)
    name = node_id or verified.node_id or urlsplit(url).netloc
    info = NodeInfo(
        name,
        url.rstrip("/"),
        verified.manifest_hash,
        verified.model or expected.model,
        verified.layers or expected.shards[verified.manifest_hash],
    )
    try:
        record = ledger.register_node(info)
    except LedgerError as exc:
        raise RegistrationRefused(f"the ledger refused the registration: {exc}") from None
    try:
        record = ledger.admit_node(name, verified.manifest_hash)
    except Unauthorized:
        return Registered(record, verified, admitted=False)  # an entry node admits it later
    return Registered(record, verified, admitted=True)
