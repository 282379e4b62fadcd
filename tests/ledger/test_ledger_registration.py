"""Registration against real nodes: fetch the bundle, verify it with teeshard.attest, check it.

The nodes are real teeshard nodes on loopback (HTTPS with their attested
self-signed certificates, simulated attestation); bad bundles come from a relay
that spoils a real node's answer.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from attestation_server import relay
from ledger_harness import ClaimRoute, World
from tests.checkpoints import TinyModel, build_tiny_model
from tests.cluster import LocalCluster, RunningNode
from trust_kit import KitNode

from teeshard.attest import Policy
from teeshard.ledger.interface import NodeInfo
from teeshard.ledger.registration import (
    INSECURE_NOTE,
    AttestVerifier,
    BundleVerifier,
    ExpectedShards,
    RegistrationRefused,
    VerifiedBundle,
    admit_from_url,
    default_node_id,
    default_verifier,
    register_from_url,
    renew_admissions,
)
from teeshard.model.layer_range import LayerRange


@pytest.fixture
def world(one_sql_one_evm: World) -> World:
    """Registration's ledger calls are covered on every backend by the main suite."""
    return one_sql_one_evm


@pytest.fixture(scope="module")
def policy_path(real_node: RunningNode) -> Path:
    """As ``teeshard up`` writes it: simulated evidence allowed, the tiny model's manifest."""
    assert real_node.config.policy_path is not None
    return real_node.config.policy_path


@pytest.fixture(scope="module")
def verifier(policy_path: Path) -> AttestVerifier:
    return default_verifier(policy_path)


@pytest.fixture(scope="module")
def impostor(
    tiny_llama: TinyModel, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningNode]:
    """A real node serving layers 2:4 of other weights (same architecture, another seed)."""
    other = build_tiny_model("llama", tmp_path_factory.mktemp("other-llama"), seed=1)
    cluster = LocalCluster(
        tiny_llama.path, 1, ranges=[LayerRange(2, 4)], model_overrides={0: other.path}
    )
    with cluster:
        yield cluster.entry


def test_a_verified_node_with_an_expected_manifest_is_registered_and_admitted(
    world: World,
    real_node: RunningNode,
    node_manifest: str,
    verifier: AttestVerifier,
    claims: ClaimRoute,
) -> None:
    expected = ExpectedShards.of([node_manifest], model="tiny")
    operator, as_operator = world.new_account()
    claims.operator = operator  # the node was started with --operator OPERATOR
    registered = register_from_url(as_operator, real_node.http_url, expected, verifier)
    record = registered.node
    assert real_node.http_url.startswith("https://")  # a self-signed attested certificate
    assert record.node_id == real_node.config.resolved_node_id  # as the chain reports it
    assert record.operator == operator and record.url == real_node.http_url
    assert (record.manifest_hash, record.model, record.layers) == (node_manifest, "tiny", "2:4")
    assert not registered.admitted  # an operator cannot vouch for itself
    assert registered.verified.provider == "simulated"
    assert INSECURE_NOTE in registered.verified.notes
    admitted = admit_from_url(world.entry, real_node.http_url, expected, verifier)
    assert admitted.admitted and admitted.node_id == record.node_id
    assert world.entry.is_operator(operator)


def test_a_node_serving_other_weights_is_refused(
    world: World, impostor: RunningNode, node_manifest: str, policy_path: Path
) -> None:
    policy = Policy.load(policy_path)
    expected = ExpectedShards.from_policy(policy)
    assert expected.shards == {node_manifest: "2:4"} and expected.model == "tiny"
    _, as_operator = world.new_account()
    # Its attestation is genuine (for its own weights); only the manifest is wrong.
    verifier = AttestVerifier(policy)
    with pytest.raises(RegistrationRefused, match=r"is not an expected shard of tiny \(expected"):
        register_from_url(as_operator, impostor.http_url, expected, verifier)
    assert world.entry.nodes() == []


def test_simulated_evidence_needs_explicit_consent(
    world: World,
    real_node: RunningNode,
    node_manifest: str,
    policy_path: Path,
    claims: ClaimRoute,
) -> None:
    expected = ExpectedShards.of([node_manifest])
    claims.operator, as_operator = world.new_account()
    # the cluster's policy, less its allow_simulated: it still names the node's manifest
    strict = AttestVerifier(replace(Policy.load(policy_path), allow_simulated=False))
    refused = r"^simulated evidence \(no TEE\) is refused; pass --allow-simulated"
    for verifier in (None, AttestVerifier(), strict):
        with pytest.raises(RegistrationRefused, match=refused):
            register_from_url(as_operator, real_node.http_url, expected, verifier)
    assert world.entry.nodes() == []
    consenting = default_verifier(allow_simulated=True)
    registered = register_from_url(as_operator, real_node.http_url, expected, consenting)
    assert INSECURE_NOTE in registered.verified.notes


REFUSALS = {  # relay behaviour -> the whole reason given
    "bad-signature": r"^signature does not verify under the certified key$",
    "wrong-nonce": r"^the bundle answers a different nonce \(replayed evidence\?\)$",
    # fetched under the attestation caps (a358378): the reason follows the bundle's URL
    "no-certificate": r"^no usable attestation bundle from http://127\.0\.0\.1:\d+/v1/attestation: "
    r"bundle: missing field\(s\) certificate$",
    "http-404": r"^no usable attestation bundle from http://127\.0\.0\.1:\d+/v1/attestation: "
    r".*attestation endpoint answered HTTP 404$",
}


@pytest.mark.parametrize("behaviour", REFUSALS)
def test_tampered_bundles_are_refused_with_the_reason(
    world: World,
    real_node: RunningNode,
    node_manifest: str,
    verifier: AttestVerifier,
    behaviour: str,
    claims: ClaimRoute,
) -> None:
    expected = ExpectedShards.of([node_manifest])
    claims.operator, as_operator = world.new_account()
    node_id = real_node.config.resolved_node_id
    with relay(real_node.http_url, behaviour) as spoiled:
        with pytest.raises(RegistrationRefused, match=REFUSALS[behaviour]):
            register_from_url(as_operator, spoiled.url, expected, verifier, node_id=node_id)
        # the same relay passing bundle and claim through: the node's own operator may
        # register it there (the relay only forwards; the node's key is the identity)
        spoiled.behaviour = "good"
        registered = register_from_url(
            as_operator, spoiled.url, expected, verifier, node_id=node_id
        )
    assert registered.node.manifest_hash == node_manifest


def test_a_relay_cannot_make_someone_else_the_operator(
    world: World,
    real_node: RunningNode,
    node_manifest: str,
    verifier: AttestVerifier,
    claims: ClaimRoute,
) -> None:
    """Issue 9 item 1 against a real node: the relay passes a genuine bundle and claim."""
    expected = ExpectedShards.of([node_manifest])
    claims.operator, _ = world.new_account()  # carol started the node
    mallory, as_mallory = world.new_account()
    with relay(real_node.http_url, "good") as spoiled:
        with pytest.raises(RegistrationRefused, match="names operator"):
            register_from_url(as_mallory, spoiled.url, expected, verifier)  # as the relay
        with pytest.raises(RegistrationRefused, match="names operator"):
            register_from_url(
                as_mallory, spoiled.url, expected, verifier,
                node_id=real_node.config.resolved_node_id,
            )  # fmt: skip
    with pytest.raises(RegistrationRefused, match="names operator"):  # squatting it directly
        register_from_url(as_mallory, real_node.http_url, expected, verifier)
    claims.operator = None  # a node started without --operator makes no claim at all
    with pytest.raises(RegistrationRefused, match="no operator claim"):
        register_from_url(as_mallory, real_node.http_url, expected, verifier)
    assert world.entry.nodes() == [] and not world.entry.is_operator(mallory)


def test_the_hook_takes_any_bundle_verifier(
    world: World, real_node: RunningNode, claims: ClaimRoute
) -> None:
    seen: list[tuple[Mapping[str, Any], bytes]] = []

    class Strict:
        def verify(self, bundle: Mapping[str, Any], nonce: bytes) -> VerifiedBundle:
            seen.append((bundle, nonce))
            raise RegistrationRefused("policy: measurement not allowed")

    class Lenient:
        def verify(self, bundle: Mapping[str, Any], nonce: bytes) -> VerifiedBundle:
            return VerifiedBundle("ab" * 32, "custom", "tiny", "2:4", ("custom check",))

    hooks: list[BundleVerifier] = [Strict(), Lenient()]
    claims.operator, as_operator = world.new_account()
    with pytest.raises(RegistrationRefused, match="measurement not allowed"):
        register_from_url(as_operator, real_node.http_url, ExpectedShards.of(["ab" * 32]), hooks[0])
    bundle, nonce = seen[0]
    assert len(nonce) == 32 and bundle["nonce"] == nonce.hex()  # the real node's answer
    registered = register_from_url(
        as_operator, real_node.http_url, ExpectedShards.of(["ab" * 32]), hooks[1]
    )
    assert registered.node.node_id == real_node.config.resolved_node_id
    assert registered.verified.notes == ("custom check",)


@pytest.mark.parametrize(
    "url, node_id",
    [
        ("https://10.0.0.5:8443", "10.0.0.5:8443"),
        ("http://node.example/", "node.example:80"),
        ("https://node.example/prefix", "node.example:443"),
    ],
)
def test_the_default_node_id_is_host_and_port(url: str, node_id: str) -> None:
    assert default_node_id(url) == node_id


def test_admissions_are_renewed_by_attesting_again(
    world: World,
    real_node: RunningNode,
    node_manifest: str,
    verifier: AttestVerifier,
    claims: ClaimRoute,
) -> None:
    if not world.sql:
        pytest.skip("admission epochs are the SQL ledger's; on chain: the bond and eviction")
    world.owner.set_admission_epoch(1.0)  # type: ignore[attr-defined]
    expected = ExpectedShards.of([node_manifest])
    claims.operator, as_operator = world.new_account()
    register_from_url(as_operator, real_node.http_url, expected, verifier)
    gone = world.new_account()[1]  # a node that stops answering is not renewed
    dead = KitNode("127.0.0.1:9", node_manifest, LayerRange(2, 4))
    info = NodeInfo(dead.node_id, "http://127.0.0.1:9", node_manifest, "tiny", "2:4")
    gone.register_node(info, claim=dead.claim(gone.actor, gone))
    first = renew_admissions(world.entry, expected, verifier)
    assert first.renewed == (real_node.config.resolved_node_id,)
    assert list(first.refused) == ["127.0.0.1:9"]
    time.sleep(1.1)
    assert not world.entry.is_operator(claims.operator)  # the epoch ran out
    assert renew_admissions(world.entry, expected, verifier).renewed == first.renewed
    assert world.entry.is_operator(claims.operator)
