"""The offload statement in a manifest: quoted through the combined hash, strict to parse,
and judged by the policy check."""

from __future__ import annotations

import dataclasses

import pytest

from teeshard.attest.errors import FormatError
from teeshard.attest.manifest import ShardManifest, compute_manifest
from teeshard.model.checkpoint import Checkpoint
from teeshard.model.layer_range import LayerRange
from teeshard.offload import (
    OffloadAttestation,
    OffloadConfigError,
    OffloadMode,
    OffloadPolicyError,
    check_offload_policy,
)
from tests.checkpoints import TinyModel


def statement(mode: OffloadMode = OffloadMode.BLINDED_VERIFIED) -> OffloadAttestation:
    pads = "tee-precomputed" if mode.blinded else None
    return OffloadAttestation(mode, ("ab" * 32,), pads)


def test_statement_changes_the_combined_hash_not_the_weights_hash(tiny_llama: TinyModel) -> None:
    plain = compute_manifest(Checkpoint(tiny_llama.path), LayerRange(0, 4), "float32")
    with_offload = dataclasses.replace(plain, offload=statement().to_json())
    assert plain.combined_hash == plain.weights_hash  # no statement: hashes as before
    assert with_offload.weights_hash == plain.weights_hash
    assert with_offload.combined_hash != plain.combined_hash
    other_key = dataclasses.replace(
        plain,
        offload=OffloadAttestation(
            OffloadMode.BLINDED_VERIFIED, ("cd" * 32,), "tee-precomputed"
        ).to_json(),
    )
    assert other_key.combined_hash != with_offload.combined_hash
    parsed = ShardManifest.from_json(with_offload.to_json())
    assert parsed == with_offload and parsed.combined_hash == with_offload.combined_hash
    assert "offload" not in plain.to_json()


def test_a_rewritten_statement_is_detected(tiny_llama: TinyModel) -> None:
    """A host that edits the mode in a bundle's JSON breaks the stated combined hash."""
    manifest = compute_manifest(Checkpoint(tiny_llama.path), LayerRange(0, 4), "float32")
    data = dataclasses.replace(manifest, offload=statement(OffloadMode.PLAIN).to_json()).to_json()
    data["offload"] = statement().to_json()
    with pytest.raises(FormatError, match="combined_hash does not match"):
        ShardManifest.from_json(data)


def test_statement_parsing_is_strict() -> None:
    good = statement().to_json()
    assert OffloadAttestation.from_json(good) == statement()
    for bad in (
        {**good, "extra": 1},
        {**good, "mode": "nothing"},
        {**good, "insecure": True},  # contradicts the mode
        {**good, "pads": "reused"},
        {**good, "accelerator_keys": "ab"},
    ):
        with pytest.raises((OffloadPolicyError, OffloadConfigError)):
            OffloadAttestation.from_json(bad)


@pytest.mark.parametrize(
    ("required", "accepted"),
    [
        ("any", {"plain", "blinded", "verified", "blinded+verified"}),
        ("protected", {"blinded", "verified", "blinded+verified"}),
        ("blinded", {"blinded", "blinded+verified"}),
        ("verified", {"verified", "blinded+verified"}),
        ("blinded+verified", {"blinded+verified"}),
        ("forbid", set()),
    ],
)
def test_policy_values(required: str, accepted: set[str]) -> None:
    for mode in OffloadMode:
        if mode.value in accepted:
            check_offload_policy(required, statement(mode))
        else:
            with pytest.raises(OffloadPolicyError):
                check_offload_policy(required, statement(mode))
    check_offload_policy(required, None)  # a TEE-only node meets every requirement
    with pytest.raises(OffloadConfigError):
        check_offload_policy("sometimes", None)
