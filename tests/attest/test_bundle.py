"""Bundles: every check of verify_bundle, with simulated nodes and with real TDX quotes."""

from __future__ import annotations

import dataclasses
import datetime
import json
import secrets
from pathlib import Path

import pytest

from teeshard.attest.attester import NodeAttestation
from teeshard.attest.errors import (
    BindingError,
    CollateralError,
    FormatError,
    FreshnessError,
    ManifestMismatch,
    MeasurementError,
    SignatureError,
    SimulatedRefused,
    VerificationError,
)
from teeshard.attest.evidence import Bundle, Evidence, nonce_message, report_data_for
from teeshard.attest.identity import NodeIdentity
from teeshard.attest.manifest import ShardManifest
from teeshard.attest.providers.simulated import SimulatedProvider
from teeshard.attest.verify.bundle import verify_bundle
from teeshard.attest.verify.policy import ManifestExpectation, Policy
from teeshard.attest.verify.quote import CollateralFile, load_collateral, verify_quote
from tests.attest.helpers import DATA, VECTOR_TIME, NodeFactory

ALLOW = Policy(allow_simulated=True)


@pytest.fixture
def node(make_node: NodeFactory, manifests: dict[str, ShardManifest]) -> NodeAttestation:
    return make_node(manifests["0:2"])


def fresh(node: NodeAttestation) -> tuple[Bundle, bytes]:
    nonce = secrets.token_bytes(32)
    return node.bundle(nonce), nonce


def test_simulated_bundle_verifies_when_allowed(node: NodeAttestation) -> None:
    bundle, nonce = fresh(node)
    verified = verify_bundle(
        bundle, ALLOW, nonce=nonce, expected_manifest_hash=node.manifest.combined_hash
    )
    assert verified.insecure and verified.provider == "simulated"
    assert verified.fingerprint == node.identity.fingerprint
    assert verified.sealing_public_key == node.identity.sealing_public_key
    assert verified.manifest == node.manifest
    assert any("INSECURE" in w for w in verified.warnings)
    assert any("INSECURE" in line for line in verified.summary())


def test_simulated_evidence_refused_by_default(node: NodeAttestation) -> None:
    bundle, nonce = fresh(node)
    with pytest.raises(SimulatedRefused, match="--allow-simulated"):
        verify_bundle(bundle, Policy(), nonce=nonce, expected_manifest_hash=bytes(32))


def test_wrong_nonce_is_refused(node: NodeAttestation) -> None:
    bundle, _ = fresh(node)
    with pytest.raises(FreshnessError, match="different nonce"):
        verify_bundle(bundle, ALLOW, nonce=secrets.token_bytes(32))


@pytest.mark.parametrize("offset", [301, -120])
def test_old_or_future_nonce_signature_is_refused(node: NodeAttestation, offset: int) -> None:
    bundle, nonce = fresh(node)
    with pytest.raises(FreshnessError, match="signed"):
        verify_bundle(bundle, ALLOW, nonce=nonce, now=bundle.signed_at + offset)


def test_expired_certificate_is_refused(node: NodeAttestation) -> None:
    nonce = secrets.token_bytes(32)
    later = node.identity.certificate.not_valid_after_utc.timestamp() + 3600
    bundle = node.bundle(nonce, now=later)
    with pytest.raises(FreshnessError, match="certificate"):
        verify_bundle(bundle, ALLOW, nonce=nonce, now=later)


def test_altered_nonce_signature_is_refused(node: NodeAttestation) -> None:
    bundle, nonce = fresh(node)
    signature = bytearray(bundle.nonce_signature)
    signature[-1] ^= 1
    with pytest.raises(SignatureError):
        verify_bundle(
            dataclasses.replace(bundle, nonce_signature=bytes(signature)), ALLOW, nonce=nonce
        )
    # A signature by a key other than the attested one is refused too.
    other = NodeIdentity.generate()
    message = nonce_message(nonce, bundle.signed_at, node.manifest.combined_hash)
    with pytest.raises(SignatureError):
        verify_bundle(
            dataclasses.replace(bundle, nonce_signature=other.sign(message)), ALLOW, nonce=nonce
        )


def resigned(
    node: NodeAttestation, identity: NodeIdentity, **changes: object
) -> tuple[Bundle, bytes]:
    """A bundle whose parts were swapped and whose nonce was signed by ``identity``."""
    bundle, nonce = fresh(node)
    bundle = dataclasses.replace(bundle, certificate_pem=identity.certificate_pem, **changes)
    message = nonce_message(nonce, bundle.signed_at, bundle.manifest.combined_hash)
    return dataclasses.replace(bundle, nonce_signature=identity.sign(message)), nonce


def test_binding_refuses_another_certificate(node: NodeAttestation) -> None:
    """Someone else's key presented with this node's quote: the report_data does not match."""
    impostor = NodeIdentity.generate()
    bundle, nonce = resigned(node, impostor)
    with pytest.raises(BindingError, match="does not commit"):
        verify_bundle(bundle, ALLOW, nonce=nonce, expected_manifest_hash=bytes(32))


def test_binding_refuses_another_manifest_or_sealing_key(
    node: NodeAttestation, manifests: dict[str, ShardManifest]
) -> None:
    other = manifests["2:3"]
    bundle, nonce = resigned(node, node.identity, manifest=other)
    with pytest.raises(BindingError):
        verify_bundle(bundle, ALLOW, nonce=nonce, expected_manifest_hash=other.combined_hash)
    bundle, nonce = resigned(node, node.identity, sealing_public_key=bytes(32))
    with pytest.raises(BindingError):
        verify_bundle(bundle, ALLOW, nonce=nonce, expected_manifest_hash=bytes(32))


def test_manifest_must_be_the_expected_one(node: NodeAttestation) -> None:
    bundle, nonce = fresh(node)
    with pytest.raises(ManifestMismatch, match="is not the expected"):
        verify_bundle(bundle, ALLOW, nonce=nonce, expected_manifest_hash=bytes(32))
    with pytest.raises(ManifestMismatch, match="no expected manifest hash"):
        verify_bundle(bundle, ALLOW, nonce=nonce)
    listed = dataclasses.replace(
        ALLOW,
        manifests=(ManifestExpectation(node.manifest.layers, node.manifest.combined_hash),),
    )
    assert verify_bundle(bundle, listed, nonce=nonce).manifest_hash == node.manifest.combined_hash


def test_simulated_keys_can_be_pinned(node: NodeAttestation) -> None:
    bundle, nonce = fresh(node)
    expected = node.manifest.combined_hash
    pinned = dataclasses.replace(ALLOW, simulated_keys=frozenset({bytes(32)}))
    with pytest.raises(MeasurementError, match="simulated key"):
        verify_bundle(bundle, pinned, nonce=nonce, expected_manifest_hash=expected)


def test_tampered_simulated_quote_is_refused(node: NodeAttestation) -> None:
    bundle, nonce = fresh(node)
    quote = bytearray(bundle.evidence.quote)
    quote[40] ^= 1  # inside report_data
    evidence = dataclasses.replace(bundle.evidence, quote=bytes(quote))
    with pytest.raises(SignatureError, match="simulated quote"):
        verify_bundle(dataclasses.replace(bundle, evidence=evidence), ALLOW, nonce=nonce)


def test_bundle_json_is_strict_and_labels_simulated_evidence(node: NodeAttestation) -> None:
    bundle, _ = fresh(node)
    data = json.loads(bundle.dumps())
    assert set(data) == {
        "version", "evidence", "manifest", "certificate", "sealing_public_key", "nonce",
        "signed_at", "nonce_signature",
    }  # fmt: skip
    assert data["evidence"]["insecure"] is True and "INSECURE" in data["evidence"]["warning"]
    assert Bundle.from_json(data) == bundle
    with pytest.raises(FormatError, match="unknown field"):
        Bundle.from_json({**data, "prompt": "hello"})
    relabelled = json.loads(bundle.dumps())
    relabelled["evidence"]["insecure"] = False
    with pytest.raises(FormatError, match="insecure"):
        Bundle.from_json(relabelled)
    short_nonce = json.loads(bundle.dumps())
    short_nonce["nonce"] = "00"
    with pytest.raises(FormatError, match="nonce"):
        Bundle.from_json(short_nonce)
    with pytest.raises(FormatError, match="not JSON"):
        Bundle.loads("{")


def test_bad_nonces_are_refused_by_the_node(node: NodeAttestation) -> None:
    for nonce_hex in ("", "zz", "00" * 8, "00" * 65):
        with pytest.raises(FormatError):
            node.bundle_json(nonce_hex)
    assert node.bundle_json("ab" * 32)["nonce"] == "ab" * 32


# -- real TDX quotes inside bundles ----------------------------------------------------


@pytest.fixture(scope="module")
def tdx_policy() -> Policy:
    quote = (DATA / "tdx_quote").read_bytes()
    report = verify_quote(quote, load_collateral(DATA / "tdx_quote_collateral.json"), VECTOR_TIME)
    assert report.mrtd and report.rtmr0 and report.rtmr1 and report.rtmr2 and report.rtmr3
    return Policy(
        mrtd=frozenset({report.mrtd}), rtmr0=frozenset({report.rtmr0}),
        rtmr1=frozenset({report.rtmr1}), rtmr2=frozenset({report.rtmr2}),
        rtmr3=frozenset({report.rtmr3}),
    )  # fmt: skip


def tdx_bundle(manifest: ShardManifest) -> tuple[Bundle, bytes]:
    """A real TDX quote (whose report_data binds someone else's key) in a node's bundle."""
    when = datetime.datetime.fromtimestamp(VECTOR_TIME, datetime.UTC)
    identity = NodeIdentity.generate(now=when)
    quote = (DATA / "tdx_quote").read_bytes()
    evidence = Evidence("tsm", "tdx", quote, bytes(64))
    node = NodeAttestation(identity, manifest, evidence)
    nonce = secrets.token_bytes(32)
    return node.bundle(nonce, now=VECTOR_TIME), nonce


def test_real_quote_verifies_then_fails_the_binding(
    manifests: dict[str, ShardManifest], tdx_policy: Policy
) -> None:
    manifest = manifests["0:2"]
    bundle, nonce = tdx_bundle(manifest)
    collateral = CollateralFile(DATA / "tdx_quote_collateral.json")
    kwargs = {"nonce": nonce, "now": VECTOR_TIME, "collateral": collateral,
              "expected_manifest_hash": manifest.combined_hash}  # fmt: skip
    with pytest.raises(BindingError):
        verify_bundle(bundle, tdx_policy, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(MeasurementError, match="MRTD"):
        verify_bundle(bundle, Policy(), **kwargs)  # type: ignore[arg-type]
    with pytest.raises(CollateralError):
        verify_bundle(bundle, tdx_policy, nonce=nonce, now=VECTOR_TIME)


def test_sev_snp_evidence_is_not_accepted(manifests: dict[str, ShardManifest]) -> None:
    identity = NodeIdentity.generate()
    manifest = manifests["0:2"]
    report_data = report_data_for(
        identity.public_key_der, manifest.combined_hash, identity.sealing_public_key
    )
    node = NodeAttestation(identity, manifest, Evidence("tsm", "sev-snp", b"report", report_data))
    nonce = secrets.token_bytes(16)
    with pytest.raises(VerificationError, match="cannot be verified"):
        verify_bundle(node.bundle(nonce), ALLOW, nonce=nonce)


def test_persisted_simulated_key_survives_restarts(tmp_path: Path) -> None:
    directory = tmp_path
    first = SimulatedProvider.from_data_dir(directory)
    second = SimulatedProvider.from_data_dir(directory)
    assert first.public_key == second.public_key
    assert (directory / "simulated-attestation-key.pem").stat().st_mode & 0o077 == 0
