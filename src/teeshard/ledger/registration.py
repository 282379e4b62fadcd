"""Registering a node in the pool: fetch its attestation bundle, verify it, check its manifest.

Flow (``register_from_url``): a fresh 32-byte nonce; ``GET {url}/v1/attestation?nonce=HEX``;
the ``BundleVerifier`` checks the bundle and returns the manifest hash and the
certificate it vouches for; that hash must be one of the model's expected shard
hashes (``ExpectedShards``); then ``GET {url}/v1/operator-claim?nonce=HEX&ledger=ID``
must return a claim made by that certificate, for this nonce and ledger, naming
the registering account (``teeshard.ledger.claims``); only then is the node
registered. Admission (``admit_from_url``, by an entry node) does the same with
its own nonce and passes the ledger what it verified: the URL and the claim.
Anything else raises ``RegistrationRefused`` with the reason.

``AttestVerifier`` is the verifier: :func:`teeshard.attest.verify_bundle` against
a ``Policy`` (quote, TCB, measurements, report_data binding, signature over our
nonce). It passes the bundle's own manifest hash as the expected one, because
which shards the pool takes is the registration's question, answered by
``ExpectedShards`` (which a policy's ``[[manifests]]`` can supply). ``BundleVerifier``
remains the hook: any object with that ``verify`` method will do.
"""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import httpx

from teeshard.attest.client import ATTESTATION_PATH
from teeshard.attest.client import fetch_bundle as attest_fetch_bundle
from teeshard.attest.errors import AttestationError, FormatError
from teeshard.attest.evidence import Bundle
from teeshard.attest.verify.bundle import verify_bundle
from teeshard.attest.verify.policy import Policy
from teeshard.attest.verify.quote import CollateralSource, collateral_source
from teeshard.ledger.claims import CLAIM_PATH, AttestedNode, OperatorClaim, verify_claim
from teeshard.ledger.interface import (
    Ledger,
    LedgerError,
    NodeInfo,
    NodeRecord,
    Unauthorized,
    check_manifest_hash,
)

INSECURE_NOTE = "INSECURE: simulated evidence accepted: no TEE backs this node"


class RegistrationRefused(Exception):
    """The node was not registered; the message says why."""


@dataclass(frozen=True)
class VerifiedBundle:
    manifest_hash: str  # hex, lower case: the combined hash its receipts bind
    provider: str
    model: str = ""
    layers: str = ""  # "START:END"
    notes: tuple[str, ...] = ()  # what was checked, and any INSECURE caveat
    certificate_pem: bytes = b""  # the attested certificate (operator claims must be its)
    # the hash of its weights, without a TSQP offload statement: what expected shards
    # list (a node that offloads quotes both; "": the same as manifest_hash)
    weights_hash: str = ""

    @property
    def shard_hash(self) -> str:
        return self.weights_hash or self.manifest_hash


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

    @classmethod
    def from_policy(cls, policy: Policy) -> ExpectedShards:
        """The shards a policy's ``[[manifests]]`` name (``teeshard up`` lists every one)."""
        if not policy.manifests:
            raise ValueError("the policy lists no [[manifests]]: no expected shard hashes")
        models = {m.model for m in policy.manifests}
        model = models.pop() if len(models) == 1 else None
        return cls(
            model or "",
            {m.manifest_hash.hex(): str(m.layers) for m in policy.manifests},
        )


@dataclass(frozen=True)
class AttestVerifier:
    """A ``BundleVerifier`` on :mod:`teeshard.attest`: every claim of the bundle, per policy."""

    policy: Policy = field(default_factory=Policy)
    collateral: CollateralSource | None = None  # needed for TDX/SGX quotes

    def verify(self, bundle: Mapping[str, Any], nonce: bytes) -> VerifiedBundle:
        try:
            parsed = Bundle.from_json(bundle)
        except FormatError as exc:
            raise RegistrationRefused(f"malformed attestation bundle: {exc}") from None
        try:
            node = verify_bundle(
                parsed, self.policy, nonce=nonce, collateral=self.collateral,
                expected_manifest_hash=parsed.manifest.weights_hash,  # ExpectedShards decides
            )  # fmt: skip
        except AttestationError as exc:
            raise RegistrationRefused(str(exc)) from None
        checked = "simulated quote" if node.insecure else f"{node.tee_type.upper()} quote"
        notes = [
            f"{checked} ({node.provider}) binds certificate {node.fingerprint.hex()[:16]}…, "
            "the manifest and the sealing key; our nonce is signed by the attested key"
        ]
        if node.tcb_status is not None:
            notes.append(f"TCB status {node.tcb_status}")
        if node.insecure:
            notes.append(INSECURE_NOTE)
        return VerifiedBundle(
            node.manifest_hash.hex(),
            node.provider,
            node.manifest.model,
            str(node.manifest.layers),
            tuple(notes),
            node.certificate_pem,
            node.manifest.weights_hash.hex(),
        )


def default_verifier(
    policy: Policy | str | Path | None = None,
    *,
    allow_simulated: bool = False,
    collateral: str | Path | None = None,
    pccs_url: str | None = None,
) -> AttestVerifier:
    """``AttestVerifier`` from a policy (or its file; default: the strict ``Policy()``).

    ``allow_simulated`` accepts INSECURE simulated evidence whatever the policy says;
    ``collateral`` (a cached JSON file) or else ``pccs_url`` serves TDX/SGX quotes.
    """
    if isinstance(policy, Policy):
        policy = policy.allowing_simulated() if allow_simulated else policy
    else:
        policy = Policy.load(policy, allow_simulated=allow_simulated)
    return AttestVerifier(policy, collateral_source(collateral, pccs_url))


# -- registration --------------------------------------------------------------------


@dataclass(frozen=True)
class Registered:
    node: NodeRecord
    verified: VerifiedBundle
    admitted: bool


def default_node_id(url: str) -> str:
    """``host:port`` of the URL: how an entry node names the nodes of its chain."""
    parts = urlsplit(url)
    try:
        port = parts.port or {"https": 443, "wss": 443}.get(parts.scheme, 80)
    except ValueError:
        raise RegistrationRefused(f"{url}: the port is not a number") from None
    return f"{parts.hostname}:{port}"


def fetch_bundle(url: str, nonce: bytes, timeout_s: float = 15.0) -> Mapping[str, Any]:
    """The node's bundle for ``nonce``, unverified.

    ``verify=False``: nodes other than the entry serve TLS with a self-signed
    certificate that only the bundle itself attests. Nothing fetched here is
    trusted before the verifier has checked it, and the bundle authenticates
    itself (quote, report_data binding, signature over our fresh nonce), so the
    transport adds nothing to check. It is read under the attestation library's
    size caps: whoever answers is not trusted yet.
    """
    shown = url.rstrip("/") + ATTESTATION_PATH  # messages name the endpoint, not our nonce
    try:
        return attest_fetch_bundle(url, nonce, timeout=timeout_s).to_json()
    except AttestationError as exc:
        raise RegistrationRefused(f"no usable attestation bundle from {shown}: {exc}") from None
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        raise RegistrationRefused(
            f"could not fetch the attestation bundle from {shown}: {exc}"
        ) from None


def verify_node(
    url: str,
    expected: ExpectedShards,
    verifier: BundleVerifier | None = None,
    nonce: bytes | None = None,
) -> VerifiedBundle:
    """Fetch the bundle with a fresh nonce, verify it, check the manifest is an expected shard.

    Expected shards list the hashes of weights; a node that offloads its linear layers
    (TSQP) quotes a combined hash over its weights hash and its offload statement, so
    its weights hash is what is checked, and the combined one what is registered
    (its receipts bind it).
    """
    nonce = nonce or os.urandom(32)
    verified = (verifier or default_verifier()).verify(fetch_bundle(url, nonce), nonce)
    if verified.shard_hash not in expected.shards:
        known = ", ".join(f"{v or '?'}={h[:12]}…" for h, v in expected.shards.items())
        raise RegistrationRefused(
            f"the node's manifest hash {verified.shard_hash} is not an expected shard of "
            f"{expected.model or 'the model'} (expected: {known})"
        )
    return verified


def fetch_claim(url: str, nonce: bytes, ledger_id: str, timeout_s: float = 15.0) -> OperatorClaim:
    """The node's operator claim for ``nonce`` and ``ledger_id``, unverified (see fetch_bundle)."""
    endpoint = f"{url.rstrip('/')}{CLAIM_PATH}"
    try:
        response = httpx.get(
            endpoint, params={"nonce": nonce.hex(), "ledger": ledger_id},
            timeout=timeout_s, verify=False,
        )  # fmt: skip
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        raise RegistrationRefused(
            f"could not fetch the operator claim from {endpoint}: {exc}"
        ) from None
    if response.status_code != 200:
        raise RegistrationRefused(
            f"{endpoint} answered HTTP {response.status_code}: no operator claim "
            "(start the node with --operator ACCOUNT)"
        )
    try:
        return OperatorClaim.from_json(response.json())
    except (ValueError, LedgerError) as exc:
        raise RegistrationRefused(f"{endpoint} returned no valid claim: {exc}") from None


def _verified_claim(
    ledger: Ledger,
    url: str,
    expected: ExpectedShards,
    verifier: BundleVerifier | None,
    name: str | None,
    operator: str | None,
) -> tuple[VerifiedBundle, OperatorClaim, str]:
    """Verify the node, then fetch and check its claim for the same fresh nonce."""
    nonce = os.urandom(32)
    verified = verify_node(url, expected, verifier, nonce)
    node_id = name or default_node_id(url)
    ledger_id = ledger.ledger_id()
    claim = fetch_claim(url, nonce, ledger_id)
    try:
        verify_claim(
            claim, operator=operator if operator is not None else claim.operator,
            node_id=node_id, ledger_id=ledger_id, nonce=nonce,
            certificate_pem=verified.certificate_pem or None,
        )  # fmt: skip
    except LedgerError as exc:
        raise RegistrationRefused(str(exc)) from None
    return verified, claim, node_id


def admit_from_url(
    ledger: Ledger,
    url: str,
    expected: ExpectedShards,
    verifier: BundleVerifier | None = None,
    *,
    node_id: str | None = None,
) -> NodeRecord:
    """An entry node (or the owner) admits a registered node after verifying it itself.

    Run again each admission epoch: an admission that is not renewed expires.
    """
    verified, claim, name = _verified_claim(ledger, url, expected, verifier, node_id, None)
    try:
        return ledger.admit_node(
            name, verified.manifest_hash, attested=AttestedNode(url.rstrip("/"), claim)
        )
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
    verified, claim, name = _verified_claim(ledger, url, expected, verifier, node_id, ledger.actor)
    info = NodeInfo(
        name,
        url.rstrip("/"),
        verified.manifest_hash,
        verified.model or expected.model,
        verified.layers or expected.shards[verified.shard_hash],
    )
    try:
        record = ledger.register_node(info, claim=claim)
    except LedgerError as exc:
        raise RegistrationRefused(f"the ledger refused the registration: {exc}") from None
    try:
        record = ledger.admit_node(
            name, verified.manifest_hash, attested=AttestedNode(url.rstrip("/"), claim)
        )
    except Unauthorized:
        return Registered(record, verified, admitted=False)  # an entry node admits it later
    return Registered(record, verified, admitted=True)


@dataclass(frozen=True)
class Renewal:
    renewed: tuple[str, ...]  # node ids admitted for another epoch
    refused: Mapping[str, str] = field(default_factory=dict)  # node id -> why not


def renew_admissions(
    ledger: Ledger, expected: ExpectedShards, verifier: BundleVerifier | None = None
) -> Renewal:
    """Attest every registered node again and admit it for another epoch (an entry node's job).

    Run it more often than the admission epoch (``teeshard pool readmit`` does it
    once): a node that is gone, or no longer verifies, is simply not renewed, and
    its admission, with its operator's free use, lapses at the end of the epoch.
    """
    renewed: list[str] = []
    refused: dict[str, str] = {}
    for node in ledger.nodes():
        try:
            admit_from_url(ledger, node.url, expected, verifier, node_id=node.node_id)
        except RegistrationRefused as exc:
            refused[node.node_id] = str(exc)
        else:
            renewed.append(node.node_id)
    return Renewal(tuple(renewed), refused)
