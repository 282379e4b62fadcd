"""Item 16: simulated evidence pinned to this machine's simulated key.

The attack: a policy with ``allow_simulated = true`` and no key accepts evidence
from ANY simulated provider, that is from anyone (a simulated quote is a software
signature). With ``simulated_keys`` it accepts only the listed key;
:func:`simulated_public_key` gives that key for a data dir so ``teeshard up`` can
write it into the policy it makes.
"""

from __future__ import annotations

import logging
import secrets
import threading
from pathlib import Path

import pytest

from teeshard.attest.attester import NodeAttestation
from teeshard.attest.errors import MeasurementError
from teeshard.attest.manifest import ShardManifest
from teeshard.attest.providers.detect import select_provider
from teeshard.attest.providers.simulated import KEY_FILE, SimulatedProvider, simulated_public_key
from teeshard.attest.verify.bundle import VerifiedNode, verify_bundle
from teeshard.attest.verify.policy import Policy


def check(node: NodeAttestation, policy: Policy) -> VerifiedNode:
    nonce = secrets.token_bytes(32)
    return verify_bundle(
        node.bundle(nonce), policy, nonce=nonce, expected_manifest_hash=node.manifest.combined_hash
    )


def test_the_key_of_a_data_dir_is_the_one_its_provider_signs_with(tmp_path: Path) -> None:
    key = simulated_public_key(tmp_path / "sim")  # made on first use
    assert (tmp_path / "sim" / KEY_FILE).stat().st_mode & 0o077 == 0
    assert simulated_public_key(tmp_path / "sim") == key
    assert SimulatedProvider.from_data_dir(tmp_path / "sim").public_key == key
    provider = select_provider("simulated", data_dir=tmp_path / "sim")
    assert isinstance(provider, SimulatedProvider) and provider.public_key == key


def test_attack_another_simulated_key_is_refused_by_a_pinned_policy(
    tmp_path: Path, manifests: dict[str, ShardManifest]
) -> None:
    ours = SimulatedProvider.from_data_dir(tmp_path / "ours")
    theirs = SimulatedProvider.from_data_dir(tmp_path / "theirs")
    policy_file = tmp_path / "policy.toml"
    policy_file.write_text(
        f'allow_simulated = true\nsimulated_keys = ["{simulated_public_key(tmp_path / "ours").hex()}"]\n'
    )
    pinned = Policy.load(policy_file)
    assert pinned.warnings() == []
    manifest = manifests["0:2"]
    impostor = NodeAttestation.create(theirs, manifest)
    with pytest.raises(MeasurementError, match=f"simulated key {theirs.public_key.hex()}"):
        check(impostor, pinned)
    genuine = check(NodeAttestation.create(ours, manifest), pinned)
    assert genuine.measurements["simulated_key"] == ours.public_key.hex()
    assert not any("any key" in w for w in genuine.warnings)


def test_an_unpinned_simulated_policy_is_flagged(
    tmp_path: Path, manifests: dict[str, ShardManifest], caplog: pytest.LogCaptureFixture
) -> None:
    policy_file = tmp_path / "policy.toml"
    policy_file.write_text("allow_simulated = true\n")
    with caplog.at_level(logging.WARNING, logger="teeshard.attest.verify.policy"):
        loose = Policy.load(policy_file)
    assert any("ANY key" in r.getMessage() for r in caplog.records)
    assert any("simulated_keys" in w for w in loose.warnings())
    # what it lets through: anyone's simulated evidence, flagged on the result
    stranger = NodeAttestation.create(SimulatedProvider(), manifests["0:2"])
    assert any("any key" in w for w in check(stranger, loose).warnings)
    assert Policy.load(None, allow_simulated=True).warnings()  # --allow-simulated alone, too


def test_nodes_starting_together_share_one_key(tmp_path: Path) -> None:
    """``teeshard up`` starts its nodes at once; each must end up with the same key."""
    keys: list[bytes] = []
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def one() -> None:
        start.wait()
        try:
            keys.append(simulated_public_key(tmp_path / "shared"))
        except BaseException as exc:  # recorded for the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=one) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert errors == [] and len(set(keys)) == 1 and len(keys) == 8
    assert [p.name for p in (tmp_path / "shared").iterdir()] == [KEY_FILE]
