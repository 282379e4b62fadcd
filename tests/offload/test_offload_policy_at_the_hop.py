"""A node's offload is checked where its neighbours verify it: the policy's ``offload`` and
``accelerator_keys`` refuse a next hop (or an upstream) that offloads against them, as an
attestation failure, never as a transport error to retry."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from teeshard.attest import Policy, PolicyError, VerificationError
from teeshard.offload import OffloadAttestation, OffloadMode
from teeshard.server.trust import check_offload

KEY = "ab" * 32


def node(mode: str | None, keys: tuple[str, ...] = (KEY,)) -> Any:
    statement = (
        None if mode is None else OffloadAttestation(OffloadMode(mode), keys, None).to_json()
    )
    return SimpleNamespace(manifest=SimpleNamespace(offload=statement))


@pytest.mark.parametrize(
    ("required", "mode", "refused"),
    [
        ("protected", "plain", True),  # the default: activations in the clear are refused
        ("protected", "blinded", False),
        ("blinded+verified", "verified", True),
        ("blinded+verified", "blinded+verified", False),
        ("forbid", "blinded+verified", True),
        ("forbid", None, False),  # a node that does not offload meets every requirement
        ("any", "plain", False),
    ],
)
def test_the_policy_decides_which_offload_a_neighbour_may_use(
    required: str, mode: str | None, refused: bool
) -> None:
    policy = Policy.from_mapping({"offload": required}, "test")
    if refused:
        with pytest.raises(VerificationError, match="offload"):
            check_offload(policy, node(mode))
    else:
        check_offload(policy, node(mode))


def test_accelerator_keys_pin_whose_gpu_may_compute() -> None:
    policy = Policy.from_mapping({"offload": "any", "accelerator_keys": [KEY]}, "test")
    check_offload(policy, node("blinded+verified"))
    with pytest.raises(VerificationError, match="accelerator key"):
        check_offload(policy, node("blinded+verified", keys=("cd" * 32,)))


def test_the_default_policy_refuses_plain_offload_and_bad_values_are_refused() -> None:
    assert Policy().offload == "protected"
    with pytest.raises(VerificationError):
        check_offload(Policy(), node("plain"))
    with pytest.raises(PolicyError, match="offload"):
        Policy.from_mapping({"offload": "sometimes"}, "test")
