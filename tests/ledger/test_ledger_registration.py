"""Registration fetches a real bundle over HTTP, verifies it and checks the manifest hash."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import pytest
from attestation_server import FakeNode, serve
from ledger_harness import World

from teeshard.ledger.registration import (
    ExpectedShards,
    InterimVerifier,
    RegistrationRefused,
    VerifiedBundle,
    admit_from_url,
    default_verifier,
    register_from_url,
)

GOOD = "1" * 64
EXPECTED = ExpectedShards("tiny", {GOOD: "0:2"})
SIMULATED_OK = InterimVerifier(allow_simulated=True)


@pytest.fixture
def world(one_sql_one_evm: World) -> World:
    """Registration's ledger calls are covered on every backend by the main suite."""
    return one_sql_one_evm


@pytest.fixture
def node() -> Iterator[FakeNode]:
    with serve(FakeNode(GOOD, node_id="node-7")) as running:
        yield running


def test_a_verified_node_with_an_expected_manifest_is_registered_and_admitted(
    world: World, node: FakeNode
) -> None:
    operator, as_operator = world.new_account()
    registered = register_from_url(as_operator, node.url, EXPECTED, SIMULATED_OK)
    assert registered.node.node_id == "node-7" and registered.node.operator == operator
    assert registered.node.layers == "0:2" and registered.node.manifest_hash == GOOD
    assert not registered.admitted  # an operator cannot vouch for itself
    assert "INSECURE: simulated evidence accepted" in registered.verified.notes
    admitted = admit_from_url(world.entry, node.url, EXPECTED, SIMULATED_OK)
    assert admitted.admitted and world.entry.is_operator(operator)


@pytest.mark.parametrize(
    "behaviour, reason",
    [
        ("bad-signature", "does not verify"),
        ("wrong-nonce", "different nonce"),
        ("no-signature", "freshness unproven"),
        ("http-404", "HTTP 404"),
    ],
)
def test_bad_bundles_are_refused_with_the_reason(
    world: World, node: FakeNode, behaviour: str, reason: str
) -> None:
    _, as_operator = world.new_account()
    node.behaviour = behaviour
    with pytest.raises(RegistrationRefused, match=reason):
        register_from_url(as_operator, node.url, EXPECTED, SIMULATED_OK)
    assert world.entry.nodes() == []


def test_unexpected_manifest_is_refused(world: World) -> None:
    _, as_operator = world.new_account()
    refused = pytest.raises(RegistrationRefused, match="not an expected shard of tiny")
    with serve(FakeNode("2" * 64)) as other, refused:
        register_from_url(as_operator, other.url, EXPECTED, SIMULATED_OK)
    assert world.entry.nodes() == []


def test_simulated_evidence_needs_explicit_consent(world: World, node: FakeNode) -> None:
    _, as_operator = world.new_account()
    with pytest.raises(RegistrationRefused, match="simulated"):
        register_from_url(as_operator, node.url, EXPECTED, InterimVerifier())


def test_a_real_quote_needs_the_attestation_verifier(world: World) -> None:
    _, as_operator = world.new_account()
    with serve(FakeNode(GOOD, provider="dstack")) as tdx:
        with pytest.raises(RegistrationRefused, match=r"teeshard\.attest\.make_bundle_verifier"):
            register_from_url(as_operator, tdx.url, EXPECTED, InterimVerifier())
        registered = register_from_url(
            as_operator, tdx.url, EXPECTED, InterimVerifier(insecure_skip_quote=True)
        )
    assert "INSECURE: quote not verified" in registered.verified.notes


def test_the_hook_takes_any_bundle_verifier(world: World, node: FakeNode) -> None:
    seen: list[bytes] = []

    class Strict:
        def verify(self, bundle: Mapping[str, Any], nonce: bytes) -> VerifiedBundle:
            seen.append(nonce)
            raise RegistrationRefused("policy: measurement not allowed")

    _, as_operator = world.new_account()
    with pytest.raises(RegistrationRefused, match="measurement not allowed"):
        register_from_url(as_operator, node.url, EXPECTED, Strict())
    assert len(seen) == 1 and len(seen[0]) == 32  # a fresh 32-byte nonce


def test_default_verifier_is_the_interim_one_until_attest_lands() -> None:
    verifier = default_verifier()
    try:
        import teeshard.attest as attest
    except ImportError:
        attest = None
    if getattr(attest, "make_bundle_verifier", None) is None:
        assert isinstance(verifier, InterimVerifier)
